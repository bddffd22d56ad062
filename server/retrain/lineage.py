"""Lineage: model version -> dataset version -> samples -> devices, and back.

A training job's ``dataset.json`` (see :mod:`training.dataset`) is stored as one
``dataset_versions`` row (the manifest without its id lists) and one ``dataset_samples`` row per
accepted sample with its side of the split. Dataset versions are content-addressed and immutable:
storing one that exists is a no-op. The queries below are what the lineage API and CLI show.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.core.errors import InvalidRequestError, NotFoundError, TrainingError
from server.db import fleet, registry
from server.db.datasets import DatasetSample, DatasetVersion
from server.db.registry import ModelVersion
from server.db.sample_store import Sample, provenance

_VERSION_RE = re.compile(r"^[0-9a-f]{64}$")
_IN_CHUNK = 2000  # ids per IN (...) list: well under every backend's parameter limit
DEFAULT_SAMPLE_LIMIT = 100  # sample ids listed by default in a lineage answer


def check_dataset_version(version: str) -> str:
    """Return ``version`` if it is a sha256 hex digest. Raises InvalidRequestError."""
    if not _VERSION_RE.match(version):
        raise InvalidRequestError("dataset version must be a sha256: 64 lowercase hex characters")
    return version


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i : i + _IN_CHUNK]


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TrainingError(f"dataset.json: {what} must be a list of strings")
    return value


def store_dataset(
    session: Session, *, manifest: Any, line: str, job_id: int | None, now: datetime
) -> str:
    """Store a dataset manifest and its sample links (idempotent); flushes, does not commit.

    Returns:
        The dataset version.

    Raises:
        TrainingError: the manifest is malformed (the trainer wrote something unexpected).
    """
    if not isinstance(manifest, dict):
        raise TrainingError("dataset.json must be a JSON object")
    version = manifest.get("dataset_version")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise TrainingError("dataset.json: dataset_version must be a sha256")
    if session.get(DatasetVersion, version) is not None:
        return version
    samples = manifest.get("samples") or {}
    base = manifest.get("base") or {}
    counts = manifest.get("counts") or {}
    split = manifest.get("split") or {}
    train_ids = _str_list(samples.get("train_ids", []), "samples.train_ids")
    field_ids = _str_list(samples.get("field_ids", []), "samples.field_ids")
    summary = {k: v for k, v in manifest.items() if k != "samples"}
    summary["samples"] = {k: v for k, v in samples.items() if k not in ("train_ids", "field_ids")}
    try:
        row = DatasetVersion(
            version=version,
            base=str(base.get("name", "")),
            base_sha256=str(base.get("sha256", ""))[:64],
            field_fraction=float(split.get("field_fraction", 0.0)),
            sample_count=len(train_ids) + len(field_ids),
            train_count=int(counts.get("train", 0)),
            field_count=int(counts.get("field_eval", 0)),
            rejected_count=len(samples.get("rejected") or []),
            manifest=summary,
            model_line=line,
            job_id=job_id,
            created_at=now,
        )
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"dataset.json is malformed: {exc}") from exc
    links = [(s, "train") for s in train_ids] + [(s, "field") for s in field_ids]
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
            present: set[str] = set()
            for chunk in _chunks([s for s, _ in links]):
                present.update(
                    session.scalars(select(Sample.sample_id).where(Sample.sample_id.in_(chunk)))
                )
            rows = [
                {"dataset_version": version, "sample_id": s, "role": role}
                for s, role in links
                if s in present
            ]
            if rows:
                session.execute(insert(DatasetSample), rows)
    except IntegrityError:
        pass  # stored concurrently by another job of the same dataset version
    return version


# ---------------------------------------------------------------- queries


def _version_public(mv: ModelVersion) -> dict[str, Any]:
    report = mv.report or {}
    return {
        "line": mv.line,
        "version": mv.version,
        "status": mv.status,
        "sha256": mv.sha256,
        "parent_version": mv.parent_version,
        "dataset_version": mv.dataset_version,
        "trainer": mv.trainer,
        "job_id": mv.job_id,
        "created_at": mv.created_at,
        "gate_reason": (report.get("gate") or {}).get("reason") or report.get("reason"),
        "reproducibility": report.get("reproducibility"),
    }


def _dataset_public(ds: DatasetVersion) -> dict[str, Any]:
    return {
        "version": ds.version,
        "base": ds.base,
        "base_sha256": ds.base_sha256,
        "field_fraction": ds.field_fraction,
        "sample_count": ds.sample_count,
        "train_count": ds.train_count,
        "field_count": ds.field_count,
        "rejected_count": ds.rejected_count,
        "model_line": ds.model_line,
        "job_id": ds.job_id,
        "created_at": ds.created_at,
        # Where the samples' labels came from (device ground truth, or captured unlabelled and
        # labelled later by the device or an operator); {} for datasets built before.
        "label_sources": dict(
            ((ds.manifest or {}).get("label_sources") or {}).get("accepted") or {}
        ),
        "manifest": ds.manifest,
    }


def _devices_of_dataset(session: Session, version: str) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Sample.device_id, func.count())
        .join(DatasetSample, DatasetSample.sample_id == Sample.sample_id)
        .where(DatasetSample.dataset_version == version)
        .group_by(Sample.device_id)
        .order_by(Sample.device_id)
    ).all()
    return [{"device_id": d, "samples": int(n)} for d, n in rows]


def _sample_ids(session: Session, version: str, *, limit: int, offset: int = 0) -> list[dict]:
    rows = session.execute(
        select(DatasetSample.sample_id, DatasetSample.role, Sample.device_id)
        .join(Sample, Sample.sample_id == DatasetSample.sample_id)
        .where(DatasetSample.dataset_version == version)
        .order_by(DatasetSample.sample_id)
        .limit(limit)
        .offset(offset)
    ).all()
    return [{"sample_id": s, "role": r, "device_id": d} for s, r, d in rows]


def _role_counts(session: Session, version: str) -> dict[str, int]:
    counts = {"train": 0, "field": 0}
    for role, n in session.execute(
        select(DatasetSample.role, func.count())
        .where(DatasetSample.dataset_version == version)
        .group_by(DatasetSample.role)
    ):
        counts[role] = int(n)
    return counts


def get_dataset(session: Session, *, version: str) -> DatasetVersion:
    row = session.get(DatasetVersion, check_dataset_version(version))
    if row is None:
        raise NotFoundError(f"unknown dataset version {version}")
    return row


def model_lineage(
    session: Session, *, line: str, version: int, sample_limit: int = DEFAULT_SAMPLE_LIMIT
) -> dict[str, Any]:
    """Model version -> its dataset version -> the samples (first ``sample_limit``) -> devices.

    Raises:
        NotFoundError: unknown line or version.
    """
    mv = registry.get_version(session, line=line, version=version)
    out: dict[str, Any] = {"model": _version_public(mv), "dataset": None}
    ds = session.get(DatasetVersion, mv.dataset_version) if mv.dataset_version else None
    if ds is not None:
        out["dataset"] = _dataset_public(ds)
        out["sample_counts"] = _role_counts(session, ds.version)
        out["samples"] = _sample_ids(session, ds.version, limit=sample_limit)
        out["devices"] = _devices_of_dataset(session, ds.version)
    else:
        out.update(sample_counts={"train": 0, "field": 0}, samples=[], devices=[])
    return out


def dataset_lineage(
    session: Session, *, version: str, sample_limit: int, offset: int = 0
) -> dict[str, Any]:
    """A dataset version, the model versions trained on it, its samples and devices."""
    ds = get_dataset(session, version=version)
    models = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.dataset_version == ds.version)
        .order_by(ModelVersion.line, ModelVersion.version)
    ).all()
    return {
        "dataset": _dataset_public(ds),
        "models": [_version_public(m) for m in models],
        "sample_counts": _role_counts(session, ds.version),
        "samples": _sample_ids(session, ds.version, limit=sample_limit, offset=offset),
        "devices": _devices_of_dataset(session, ds.version),
    }


def _models_of_datasets(session: Session, versions: list[str]) -> list[dict[str, Any]]:
    if not versions:
        return []
    models = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.dataset_version.in_(versions))
        .order_by(ModelVersion.line, ModelVersion.version)
    ).all()
    return [_version_public(m) for m in models]


def sample_lineage(session: Session, *, sample_id: str) -> dict[str, Any]:
    """A sample -> the dataset versions holding it -> the model versions trained on those.

    Raises:
        NotFoundError: unknown sample.
    """
    if not 1 <= len(sample_id) <= 64:
        raise InvalidRequestError("sample_id must be 1-64 characters")
    s = session.get(Sample, sample_id)
    if s is None:
        raise NotFoundError(f"unknown sample {sample_id!r}")
    datasets = session.execute(
        select(DatasetSample.dataset_version, DatasetSample.role, DatasetVersion.created_at)
        .join(DatasetVersion, DatasetVersion.version == DatasetSample.dataset_version)
        .where(DatasetSample.sample_id == sample_id)
        .order_by(DatasetVersion.created_at)
    ).all()
    return {
        "sample": {
            "sample_id": s.sample_id,
            "device_id": s.device_id,
            "model_line": s.model_line,
            "model_version": s.model_version,
            "true_label": s.true_label,
            "predicted_label": s.predicted_label,
            "confidence": s.confidence,
            "content_sha256": s.content_sha256,
            "received_at": s.received_at,
            "origin": s.origin,
            "label_source": s.label_source,
            "labelled_by": s.labelled_by,
            "labelled_at": s.labelled_at,
            "provenance": provenance(s.origin, s.label_source)
            if s.true_label is not None
            else None,
        },
        "datasets": [{"version": v, "role": r, "created_at": t} for v, r, t in datasets],
        "models": _models_of_datasets(session, [v for v, _, _ in datasets]),
    }


def device_lineage(session: Session, *, device_id: str) -> dict[str, Any]:
    """A device -> its accepted samples -> the dataset versions and model versions they fed.

    Raises:
        NotFoundError: unknown device.
    """
    device = fleet.get_device(session, device_id=device_id)
    total = session.scalar(
        select(func.count()).select_from(Sample).where(Sample.device_id == device_id)
    )
    per_dataset = session.execute(
        select(DatasetSample.dataset_version, func.count())
        .join(Sample, Sample.sample_id == DatasetSample.sample_id)
        .where(Sample.device_id == device_id)
        .group_by(DatasetSample.dataset_version)
        .order_by(DatasetSample.dataset_version)
    ).all()
    versions = [v for v, _ in per_dataset]
    return {
        "device": {"device_id": device.device_id, "model_line": device.model_line},
        "samples": int(total or 0),
        "datasets": [{"version": v, "samples": int(n)} for v, n in per_dataset],
        "models": _models_of_datasets(session, versions),
    }


__all__ = [
    "check_dataset_version",
    "dataset_lineage",
    "device_lineage",
    "get_dataset",
    "model_lineage",
    "sample_lineage",
    "store_dataset",
]
