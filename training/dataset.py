"""Versioned dataset assembly (pure: arrays in, a :class:`DatasetVersion` out).

A dataset version is the base training pool plus the field samples a line has gathered. Each
accepted sample is assigned to *train* or to the *recent-field evaluation* set by a hash of its
``sample_id`` alone, so a sample never changes sides as more arrive, and the field set is a fair,
never-trained-on view of what devices see now.

The version id is a content address: sha256 over the base data's hash, every accepted sample's
id and content digest (sorted by id) and the split parameters. The same inputs in any order give
the same id; adding, dropping or altering a sample gives a new one. Training rows are ordered
canonically (base first, then samples by id), so the same version trains the same model.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data import Split
from training.errors import TrainingError
from training.samples import Samples

FIELD_FRACTION = 0.2  # share of accepted samples held out as the recent-field evaluation set
SPLIT_SCHEME = "sha256(edgeloop-split/v1|sample_id)[:8] / 2**64 < field_fraction"
VERSION_SCHEME = "edgeloop-dataset/v1"
RANGE_TOLERANCE = 1e-6  # samples may exceed the input range by float rounding, no more


def array_digest(X: np.ndarray, y: np.ndarray) -> str:
    """sha256 of a labelled array pair (dtype, shape and bytes of float32 X and int64 y)."""
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(X, np.float32), np.ascontiguousarray(y, np.int64)):
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def field_bucket(sample_id: str) -> float:
    """Where ``sample_id`` falls in [0, 1): a stable function of the id alone."""
    digest = hashlib.sha256(b"edgeloop-split/v1|" + sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_field(sample_id: str, field_fraction: float = FIELD_FRACTION) -> bool:
    """True if the sample belongs to the recent-field evaluation set."""
    return field_bucket(sample_id) < field_fraction


@dataclass(frozen=True)
class DatasetVersion:
    """One immutable, content-addressed dataset: training arrays, field-eval arrays, manifest."""

    version: str
    base_name: str
    X_train: np.ndarray  # float32 [train_count, F]: base pool, then train samples by id
    y_train: np.ndarray  # int64 [train_count]
    X_field: np.ndarray  # float32 [field_eval_count, F]: field samples by id
    y_field: np.ndarray  # int64 [field_eval_count]
    train_sample_ids: tuple[str, ...]
    field_sample_ids: tuple[str, ...]
    base_count: int
    rejected: tuple[tuple[str, str], ...]  # (sample_id, reason) of samples left out
    manifest: dict[str, Any]

    @property
    def sample_count(self) -> int:
        """Accepted samples (train part + field part)."""
        return len(self.train_sample_ids) + len(self.field_sample_ids)

    @property
    def train_count(self) -> int:
        return len(self.y_train)

    @property
    def field_eval_count(self) -> int:
        return len(self.y_field)

    def summary(self) -> dict[str, Any]:
        """The ``dataset`` block of the job report."""
        return {
            "base": self.base_name,
            "base_count": self.base_count,
            "sample_count": self.sample_count,
            "train_count": self.train_count,
            "field_eval_count": self.field_eval_count,
            "rejected_count": len(self.rejected),
        }


def _screen(
    samples: Samples, n_classes: int, value_range: tuple[float, float]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Accepted rows by sample id (-> row index) and rejected (sample_id, reason) pairs."""
    lo, hi = value_range
    by_id: dict[str, list[int]] = {}
    for i, sid in enumerate(samples.sample_ids.tolist()):
        by_id.setdefault(sid, []).append(i)
    accepted: dict[str, int] = {}
    rejected: list[tuple[str, str]] = []
    for sid, rows in by_id.items():
        first = rows[0]
        x, label = samples.X[first], int(samples.y[first])
        if not sid:
            reason = "empty sample_id"
        elif any(
            not np.array_equal(samples.X[r], x) or int(samples.y[r]) != label for r in rows[1:]
        ):
            reason = f"sample_id appears {len(rows)} times with different content"
        elif not np.all(np.isfinite(x)):
            reason = "non-finite input values"
        elif x.min() < lo - RANGE_TOLERANCE or x.max() > hi + RANGE_TOLERANCE:
            reason = f"input values outside [{lo:g}, {hi:g}]"
        elif not 0 <= label < n_classes:
            reason = f"label index {label} outside [0, {n_classes})"
        else:
            accepted[sid] = first  # exact duplicates collapse to one row
            continue
        rejected.append((sid, reason))
    rejected.sort()
    return accepted, rejected


def build_dataset(
    base: Split,
    samples: Samples,
    *,
    base_name: str = "digits-train",
    field_fraction: float = FIELD_FRACTION,
    n_classes: int = 10,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> DatasetVersion:
    """Assemble the dataset version for ``base`` plus ``samples``.

    Samples with non-finite or out-of-range inputs, a label outside ``[0, n_classes)``, an empty
    id, or an id repeated with different content are left out and listed in the manifest; exact
    duplicates count once.

    Args:
        base: the line's base training pool (e.g. ``digits_pools().train``).
        samples: field samples uploaded by devices, in any order.
        base_name: human name of the base pool, recorded in the manifest.
        field_fraction: share of accepted samples (by id hash) held out for field evaluation.
        n_classes: number of labels of the model line.
        value_range: the input spec's ``[min, max]``.

    Returns:
        The :class:`DatasetVersion`; ``manifest`` is JSON-serialisable.
    """
    if not 0.0 <= field_fraction < 1.0:
        raise TrainingError(f"field_fraction must be in [0, 1), got {field_fraction}")
    accepted, rejected = _screen(samples, n_classes, value_range)
    ids = sorted(accepted)
    field_ids = [s for s in ids if is_field(s, field_fraction)]
    train_ids = [s for s in ids if not is_field(s, field_fraction)]
    train_rows = [accepted[s] for s in train_ids]
    field_rows = [accepted[s] for s in field_ids]
    n_features = base.X.shape[1]

    base_sha = array_digest(base.X, base.y)
    h = hashlib.sha256()
    header = {
        "scheme": VERSION_SCHEME,
        "base_sha256": base_sha,
        "field_fraction": field_fraction,
        "split": SPLIT_SCHEME,
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for sid in ids:
        row = accepted[sid]
        content = array_digest(samples.X[row : row + 1], samples.y[row : row + 1])
        h.update(f"\n{len(sid)}:{sid}:{content}".encode())
    version = h.hexdigest()

    X_train = np.concatenate(
        [base.X.astype(np.float32), samples.X[train_rows].reshape(-1, n_features)]
    ).astype(np.float32)
    y_train = np.concatenate([base.y.astype(np.int64), samples.y[train_rows]]).astype(np.int64)
    X_field = samples.X[field_rows].reshape(-1, n_features).astype(np.float32)
    y_field = samples.y[field_rows].astype(np.int64)

    devices = Counter(str(samples.device_ids[accepted[s]]) for s in ids)
    # Where the labels came from (device ground truth, or a captured input labelled later by the
    # device or an operator): per source, and per side of the split.
    sources = Counter(samples.source_of(accepted[s]) for s in ids)
    field_sources = Counter(samples.source_of(accepted[s]) for s in field_ids)
    manifest: dict[str, Any] = {
        "dataset_version": version,
        "scheme": VERSION_SCHEME,
        "base": {"name": base_name, "sha256": base_sha, "count": len(base.y)},
        "split": {"scheme": SPLIT_SCHEME, "field_fraction": field_fraction},
        "samples": {
            "received": len(samples),
            "accepted": len(ids),
            "train_ids": train_ids,
            "field_ids": field_ids,
            "rejected": [{"sample_id": s, "reason": r} for s, r in rejected],
        },
        "devices": dict(sorted(devices.items())),
        "label_sources": {
            "accepted": dict(sorted(sources.items())),
            "field": dict(sorted(field_sources.items())),
        },
        "counts": {
            "train": len(y_train),
            "field_eval": len(y_field),
            "train_labels": _label_counts(y_train, n_classes),
            "field_labels": _label_counts(y_field, n_classes),
        },
    }
    return DatasetVersion(
        version=version,
        base_name=base_name,
        X_train=X_train,
        y_train=y_train,
        X_field=X_field,
        y_field=y_field,
        train_sample_ids=tuple(train_ids),
        field_sample_ids=tuple(field_ids),
        base_count=len(base.y),
        rejected=tuple(rejected),
        manifest=manifest,
    )


def _label_counts(y: np.ndarray, n_classes: int) -> list[int]:
    return np.bincount(y, minlength=n_classes).astype(int).tolist()


__all__ = [
    "FIELD_FRACTION",
    "DatasetVersion",
    "array_digest",
    "build_dataset",
    "field_bucket",
    "is_field",
]
