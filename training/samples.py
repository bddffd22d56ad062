"""Uploaded field samples: the in-memory form and the ``samples.npz`` hand-off, both sides.

The server exports the samples a model line has gathered to one ``.npz`` file with four arrays of
equal length: ``X`` float32 [n, F] in the input range, ``y`` int64 [n] (class index), and
``sample_ids`` / ``device_ids`` (numpy string arrays), and optionally ``label_sources`` (numpy
strings: where each label came from, ``device``, ``device_capture+device``,
``device_capture+operator``; absent in files of older servers, read as ``device``). This module
defines that file once: the server's job runner writes it with :func:`write_samples`, the
trainer reads it with :func:`load_samples`. The reader checks the file's *structure* only;
whether each row is acceptable is decided by :func:`training.dataset.build_dataset`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import SampleError

REQUIRED_ARRAYS = ("X", "y", "sample_ids", "device_ids")


@dataclass(frozen=True)
class Samples:
    """Field samples, one row per sample; all four arrays have the same length."""

    X: np.ndarray  # float32 [n, F]
    y: np.ndarray  # int64 [n]
    sample_ids: np.ndarray  # str [n], unique per sample across the fleet
    device_ids: np.ndarray  # str [n], the device that uploaded the sample
    label_sources: np.ndarray | None = None  # str [n], label provenance; None: all "device"

    def __post_init__(self) -> None:
        n = len(self.X)
        arrays = [self.y, self.sample_ids, self.device_ids]
        if self.label_sources is not None:
            arrays.append(self.label_sources)
        if self.X.ndim != 2 or any(len(a) != n for a in arrays):
            raise SampleError(
                f"samples arrays disagree: X {self.X.shape}, y {self.y.shape}, "
                f"sample_ids {self.sample_ids.shape}, device_ids {self.device_ids.shape}"
            )

    def source_of(self, row: int) -> str:
        """Where row ``row``'s label came from."""
        return "device" if self.label_sources is None else str(self.label_sources[row])

    def __len__(self) -> int:
        return len(self.X)

    @classmethod
    def empty(cls, n_features: int) -> Samples:
        """No samples (initial training, or a line with nothing new)."""
        return cls(
            np.zeros((0, n_features), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, dtype=str),
            np.zeros(0, dtype=str),
        )


def write_samples(path: str | Path, samples: Samples) -> Path:
    """Write ``samples`` as the ``.npz`` file :func:`load_samples` reads; returns ``path``.

    ``X`` is stored as float32, ``y`` as int64 and the ids as numpy strings, whatever the dtypes
    ``samples`` holds.
    """
    arrays: dict[str, np.ndarray] = {
        "X": samples.X.astype(np.float32),
        "y": samples.y.astype(np.int64),
        "sample_ids": np.asarray(samples.sample_ids, dtype=str),
        "device_ids": np.asarray(samples.device_ids, dtype=str),
    }
    if samples.label_sources is not None:
        arrays["label_sources"] = np.asarray(samples.label_sources, dtype=str)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return Path(path)


def load_samples(path: str | Path, n_features: int) -> Samples:
    """Read ``samples.npz`` written by the server.

    Args:
        path: the file; it may hold zero rows.
        n_features: values per sample the model line expects.

    Raises:
        SampleError: unreadable file, a missing array, or arrays of the wrong type or shape.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # np.load would take anything else for a pickle
                raise SampleError(f"cannot read samples file {path}: not an .npz (zip) archive")
        with np.load(Path(path), allow_pickle=False) as npz:
            missing = [k for k in REQUIRED_ARRAYS if k not in npz.files]
            if missing:
                raise SampleError(f"{path}: missing array(s) {missing}; has {sorted(npz.files)}")
            arrays = {k: npz[k] for k in REQUIRED_ARRAYS}
            sources = npz["label_sources"] if "label_sources" in npz.files else None
    except SampleError:
        raise
    except ValueError as exc:  # object arrays need pickle, which we never allow
        raise SampleError(
            f"{path}: arrays must be numeric or numpy strings (no objects): {exc}"
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise SampleError(f"cannot read samples file {path}: {exc}") from exc

    X, y = arrays["X"], arrays["y"]
    ids, devices = arrays["sample_ids"], arrays["device_ids"]
    n = len(y) if y.ndim == 1 else -1
    if n == 0:
        return Samples.empty(n_features)  # zero rows: tolerate any empty shape the writer used
    if X.ndim != 2 or X.shape[1] != n_features or not np.issubdtype(X.dtype, np.floating):
        raise SampleError(f"{path}: X must be float [n, {n_features}], got {X.dtype} {X.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise SampleError(f"{path}: y must be an integer vector, got {y.dtype} {y.shape}")
    named = [("sample_ids", ids), ("device_ids", devices)]
    if sources is not None:
        named.append(("label_sources", sources))
    for name, arr in named:
        if arr.ndim != 1 or arr.dtype.kind != "U":
            raise SampleError(f"{path}: {name} must be a string vector, got {arr.dtype}")
    return Samples(X.astype(np.float32), y.astype(np.int64), ids, devices, sources)


__all__ = ["REQUIRED_ARRAYS", "Samples", "load_samples", "write_samples"]
