"""One training job end to end: samples -> dataset version -> challenger -> ONNX -> gate -> files.

This module is the shell around the pure parts (:mod:`training.dataset`, :mod:`training.evaluate`):
it reads the samples and the champion from disk, times training, and writes the outputs. Files are
written atomically (temp + ``os.replace``) in the order ``dataset.json``, ``model.onnx``,
``weights.npz`` (framework weights, for a later warm start), ``report.json``: the report is last,
so its presence means the job finished.

The report's ``reproducibility`` block names what fixes the result: the dataset version, a hash of
the training config (trainer, effective hyperparameters, seed, warm-start weights) and a hash of
the challenger's metrics; two runs with the same first two give the same third.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.config import IMAGEFOLDER_PREFIX
from training.data import LABELS, N_FEATURES, Split, digits_pools
from training.dataset import DatasetVersion, build_dataset
from training.errors import ChampionError, ParityError, SpecError
from training.evaluate import evaluate_gate, model_metrics
from training.export import OPSET, add_metadata, check_parity, onnx_predict_proba
from training.monitoring import build_reference, embed_reference
from training.samples import Samples, load_samples
from training.spec import JobSpec
from training.trainers import train

MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
DATASET_FILE = "dataset.json"
WEIGHTS_FILE = "weights.npz"
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024  # bytes; a larger champion weights file is refused


@dataclass(frozen=True)
class Report:
    """What the job tells the server; ``to_dict`` is the ``report.json`` document."""

    passed: bool
    reason: str
    dataset_version: str
    dataset: dict[str, Any]
    metrics: dict[str, Any]  # {"challenger": {...}, "champion": {...} | None}
    parity: dict[str, Any]
    trainer: str
    hyperparams: dict[str, Any]  # effective values (defaults + overrides)
    seed: int
    train_seconds: float
    job_id: int
    model_line: str
    champion_version: int | None
    model_sha256: str
    model_size: int  # bytes
    opset: int
    gate: dict[str, Any]  # {"passed", "reason", "checks": [...]} of the full gate
    warm_start: dict[str, Any]  # {"requested", "used", "from_version"}
    reproducibility: dict[str, Any]  # dataset_version, config_sha256, metrics_sha256, seed
    weights_sha256: str | None  # of weights.npz

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BaseData:
    """The data a model line starts from: its base training pool and its golden holdout."""

    name: str
    train: Split
    golden: Split


def resolve_base(spec: JobSpec) -> BaseData:
    """The base pool and golden holdout for the spec's line: the bundled digits, or an
    ImageFolder tree (``base = "imagefolder:<path>"``, see :mod:`training.imagefolder`).

    Raises:
        SpecError: the spec's input or labels do not match the base data.
    """
    if spec.base.startswith(IMAGEFOLDER_PREFIX):
        from training.imagefolder import load_imagefolder

        if spec.input_spec.dtype != "float32" or spec.input_spec.min > 0 or spec.input_spec.max < 1:
            raise SpecError("imagefolder data needs a float32 input_spec covering [0, 1]")
        path = spec.base.removeprefix(IMAGEFOLDER_PREFIX)
        train_pool, golden = load_imagefolder(path, spec.labels, tuple(spec.input_spec.shape))
        return BaseData(spec.base, train_pool, golden)
    shape = tuple(spec.input_spec.shape)
    if shape != (-1, N_FEATURES) or spec.input_spec.dtype != "float32":
        raise SpecError(
            f"input_spec must be float32 [-1, {N_FEATURES}] for the digits base data, got "
            f"{spec.input_spec.dtype} {list(shape)}"
        )
    if spec.labels != LABELS:
        raise SpecError(f"labels must be {list(LABELS)} for the digits base data")
    pools = digits_pools()
    return BaseData("digits-train", pools.train, pools.golden)


def _champion_proba(spec: JobSpec, X: np.ndarray) -> np.ndarray:
    assert spec.champion is not None
    path = spec.champion.onnx_path
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ChampionError(f"cannot read champion {path}: {exc.strerror or exc}") from exc
    try:
        proba = onnx_predict_proba(raw, X)
    except ParityError as exc:
        raise ChampionError(f"champion v{spec.champion.version} ({path}): {exc}") from exc
    if proba.shape[1] != len(spec.labels):
        raise ChampionError(
            f"champion v{spec.champion.version} outputs {proba.shape[1]} classes, "
            f"the line has {len(spec.labels)}"
        )
    return proba


def _champion_weights(spec: JobSpec) -> dict[str, np.ndarray] | None:
    """The champion's framework weights for a warm start (None: not asked for or not there)."""
    if not spec.warm_start or spec.champion is None or spec.champion.weights_path is None:
        return None
    path = spec.champion.weights_path
    try:
        if path.stat().st_size > MAX_WEIGHTS_BYTES:
            raise ChampionError(f"champion weights {path} are over {MAX_WEIGHTS_BYTES} bytes")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ChampionError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise ChampionError(f"cannot read champion weights {path}: {exc}") from exc


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _sha(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _with_monitoring(onnx_bytes: bytes, ds: DatasetVersion, base: BaseData, spec: JobSpec) -> bytes:
    """The model with its monitoring reference embedded (see :mod:`training.monitoring`): input
    signals from the training rows and the holdout, output signals and the confidence
    calibration from the holdout (golden + recent-field evaluation rows, never trained on)."""
    X_holdout = (
        np.concatenate([base.golden.X, ds.X_field]) if ds.field_eval_count else base.golden.X
    )
    y_holdout = (
        np.concatenate([base.golden.y, ds.y_field]) if ds.field_eval_count else base.golden.y
    )
    reference = build_reference(
        lambda X: onnx_predict_proba(onnx_bytes, X),
        ds.X_train,
        X_holdout,
        y_holdout,
        n_classes=len(spec.labels),
        value_range=(spec.input_spec.min, spec.input_spec.max),
    )
    return embed_reference(onnx_bytes, reference)


def run_job(spec: JobSpec, *, clock: Callable[[], float] = time.perf_counter) -> Report:
    """Run the job described by ``spec`` and write its outputs into ``spec.output_dir``.

    A challenger that fails the gate or the parity check is a normal outcome: the report says
    ``passed: false`` with the reason, and ``model.onnx`` is still written for inspection.

    Raises:
        SpecError: the spec does not fit the line's base data or the trainer.
        SampleError: the samples file is malformed.
        ChampionError: the champion cannot be run.
        ExportError, ParityError, TrainingError: the challenger cannot be trained or exported.
    """
    out_dir = spec.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILE).unlink(missing_ok=True)  # a stale report must not look like ours

    base = resolve_base(spec)
    n_classes = len(spec.labels)
    n_features = spec.input_spec.features
    sample_shape = tuple(d for d in spec.input_spec.shape if d != -1)
    if spec.samples_path is None:
        samples = Samples.empty(n_features)
    else:
        samples = load_samples(spec.samples_path, n_features)
    ds: DatasetVersion = build_dataset(
        base.train,
        samples,
        base_name=base.name,
        field_fraction=spec.field_fraction,
        n_classes=n_classes,
        value_range=(spec.input_spec.min, spec.input_spec.max),
    )
    init = _champion_weights(spec)

    started = clock()
    model, hyperparams = train(
        spec.trainer,
        ds.X_train,
        ds.y_train,
        n_classes=n_classes,
        seed=spec.seed,
        hyperparams=spec.hyperparams,
        sample_shape=sample_shape,
        init=init,
    )
    train_seconds = clock() - started
    warm_used = bool(getattr(model, "warm_started", False))
    weights = _npz_bytes(model.state())
    config_sha = _sha(
        {
            "trainer": spec.trainer,
            "hyperparams": hyperparams,
            "seed": spec.seed,
            "field_fraction": spec.field_fraction,
            "warm_start_from": hashlib.sha256(_npz_bytes(init)).hexdigest()
            if warm_used and init
            else None,
        }
    )

    onnx_bytes = add_metadata(
        model.to_onnx(input_name=spec.input_spec.name),
        {
            "dataset_version": ds.version,
            "trainer": spec.trainer,
            "seed": spec.seed,
            "job_id": spec.job_id,
            "model_line": spec.model_line,
            "labels": json.dumps(list(spec.labels)),
            "hyperparams": json.dumps(hyperparams, sort_keys=True),
            "base": base.name,
            "opset": OPSET,
            "config_sha256": config_sha,
            "warm_start_from": spec.champion.version if warm_used and spec.champion else "",
        },
    )
    onnx_bytes = _with_monitoring(onnx_bytes, ds, base, spec)
    parity = check_parity(onnx_bytes, model.predict_proba, base.golden.X)

    has_field = ds.field_eval_count > 0
    challenger = model_metrics(
        onnx_predict_proba(onnx_bytes, base.golden.X),
        base.golden.y,
        onnx_predict_proba(onnx_bytes, ds.X_field) if has_field else None,
        ds.y_field,
        n_classes,
    )
    champion = None
    if spec.champion is not None:
        champion = model_metrics(
            _champion_proba(spec, base.golden.X),
            base.golden.y,
            _champion_proba(spec, ds.X_field) if has_field else None,
            ds.y_field,
            n_classes,
        )
    verdict = evaluate_gate(challenger, champion, spec.gate, spec.labels)
    passed, reason = verdict.passed, verdict.reason
    if not parity["passed"]:
        passed, reason = False, f"rejected: ONNX parity failed: {parity['reason']}"

    report = Report(
        passed=passed,
        reason=reason,
        dataset_version=ds.version,
        dataset=ds.summary(),
        metrics={"challenger": challenger, "champion": champion},
        parity=parity,
        trainer=spec.trainer,
        hyperparams=hyperparams,
        seed=spec.seed,
        train_seconds=round(train_seconds, 3),
        job_id=spec.job_id,
        model_line=spec.model_line,
        champion_version=spec.champion.version if spec.champion else None,
        model_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        model_size=len(onnx_bytes),
        opset=OPSET,
        gate={**verdict.to_dict(), "passed": passed, "reason": reason, "bounds": asdict(spec.gate)},
        warm_start={
            "requested": spec.warm_start,
            "used": warm_used,
            "from_version": spec.champion.version if warm_used and spec.champion else None,
        },
        reproducibility={
            "dataset_version": ds.version,
            "config_sha256": config_sha,
            "seed": spec.seed,
            "metrics_sha256": _sha(challenger),
            "statement": "same dataset_version + config_sha256 gives the same metrics_sha256",
        },
        weights_sha256=hashlib.sha256(weights).hexdigest(),
    )
    _write_atomic(out_dir / DATASET_FILE, _json_bytes(ds.manifest))
    _write_atomic(out_dir / MODEL_FILE, onnx_bytes)
    _write_atomic(out_dir / WEIGHTS_FILE, weights)
    _write_atomic(out_dir / REPORT_FILE, _json_bytes(report.to_dict()))
    return report


__all__ = [
    "DATASET_FILE",
    "MODEL_FILE",
    "REPORT_FILE",
    "WEIGHTS_FILE",
    "BaseData",
    "Report",
    "resolve_base",
    "run_job",
]
