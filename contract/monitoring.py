"""Label-free monitoring: the reference a model ships with, and the summaries devices send.

Two documents, each defined once here and used by training, the agent and the server:

- :class:`MonitoringReference` lives in the exported ONNX file's ``metadata_props`` under
  :data:`METADATA_KEY`; the file's bytes are hashed in the signed manifest, so the reference is
  covered by the signature. It fixes the *signals* a device monitors, the bin edges of each, the
  reference histogram of each (computed by training with :meth:`MonitoringReference.histogram`,
  the very function devices run), the PCA projection of the input, and the confidence calibration
  the server's CBPE estimate of accuracy needs.
- :class:`MonitorSummary` is what a device publishes every period on
  ``Topics.monitor(device_id)``: per-signal integer bin counts, never an input. Counts from many
  devices and periods add up (they are mergeable sketches), which is how the server builds a
  window for a device group.

Signals (:class:`Signal`): ``confidence`` (top-class probability), ``margin`` (top-1 minus top-2
probability), ``predicted`` (the predicted class: one bin per class), ``input_mean``,
``input_std`` (contrast), ``input_ink`` (fraction of input values above the reference's
``ink_threshold``: foreground share of an image) and ``pc0``.. (the input projected on the
training data's principal components). Continuous signals have ``len(edges) + 1`` bins whose
outer bins are open-ended, so a drifted value far outside the training range still lands in a bin.

Parsing is strict and bounded (sizes, signal and bin counts, count values, sums); every refusal
is a :class:`~contract.MessageError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import cached_property
from typing import Any

import numpy as np

from contract._errors import MessageError
from contract.messages import (
    _device_id,
    _field,
    _model_line,
    decode_input,
    encode_input,
    loads_bounded,
)

METADATA_KEY = "edgeloop.monitoring"  # ONNX metadata_props key holding the reference JSON
FORMAT_VERSION = 1  # reference format this code writes and reads

# Limits on what a reference or a summary may hold.
MAX_REFERENCE_BYTES = 1024 * 1024  # bytes, the reference JSON in the model's metadata
MAX_SUMMARY_BYTES = 16 * 1024  # bytes, one summary message (real ones are under 2 KB)
MAX_MONITOR_JSON_DEPTH = 4  # nesting levels of either document
MAX_SIGNALS = 32  # signals per reference and per summary
MAX_BINS = 256  # bins per signal (a categorical signal has one per class)
MIN_BINS = 2  # a signal with one bin cannot show drift
MAX_COUNT = 10**12  # highest bin count (reference rows, or a period's samples)
MAX_PERIOD_S = 7 * 24 * 3600.0  # seconds one summary may cover
MAX_PCA_COMPONENTS = 16  # principal components a reference may ship
MAX_PCA_FEATURES = 4096  # input values PCA is offered for (64x64 grey); larger inputs go without


class Signal(StrEnum):
    """The signals a device can compute; a reference lists the ones it monitors."""

    CONFIDENCE = "confidence"
    MARGIN = "margin"
    PREDICTED = "predicted"
    INPUT_MEAN = "input_mean"
    INPUT_STD = "input_std"
    INPUT_INK = "input_ink"


CATEGORICAL = frozenset({Signal.PREDICTED.value})
_PC = re.compile(r"^pc(0|[1-9][0-9]?)$")


def pc_name(i: int) -> str:
    """Name of the signal holding principal component ``i`` (``pc0``, ``pc1``, ...)."""
    return f"pc{i}"


def _pc_index(name: str) -> int | None:
    m = _PC.match(name)
    return int(m.group(1)) if m else None


def known_signal(name: str) -> bool:
    """True if ``name`` is a signal this code can compute."""
    if name in Signal._value2member_map_:
        return True
    i = _pc_index(name)
    return i is not None and i < MAX_PCA_COMPONENTS


@dataclass(frozen=True)
class SignalSpec:
    """One monitored signal: its bin edges (interior cut points, ascending; empty for a
    categorical signal) and its reference histogram (``len(edges) + 1`` counts, or one per
    class)."""

    name: str
    edges: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def categorical(self) -> bool:
        return self.name in CATEGORICAL

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "edges": list(self.edges), "counts": list(self.counts)}


@dataclass(frozen=True, eq=False)
class Pca:
    """A linear projection of the flat input: ``(x - mean) @ components.T``."""

    mean: np.ndarray  # float32 [features]
    components: np.ndarray  # float32 [k, features], rows orthonormal

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pca):
            return NotImplemented
        return np.array_equal(self.mean, other.mean) and np.array_equal(
            self.components, other.components
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "k": self.k,
            "mean": encode_input(self.mean),
            "components": encode_input(self.components),
        }


@dataclass(frozen=True)
class Calibration:
    """Holdout calibration of the top-class confidence, one entry per bin of the ``confidence``
    signal: ``rows`` holdout rows fell in the bin, ``correct`` of them were right, and
    ``accuracy`` is the smoothed (monotone) accuracy the server expects of a prediction in it.
    ``labels`` is the holdout's true-class histogram (the class prior)."""

    rows: tuple[int, ...]
    correct: tuple[int, ...]
    accuracy: tuple[float, ...]
    labels: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "correct": list(self.correct),
            "accuracy": list(self.accuracy),
            "labels": list(self.labels),
        }


def _ints(raw: Any, what: str, *, low: int = 0, high: int = MAX_COUNT) -> tuple[int, ...]:
    if not isinstance(raw, list) or not MIN_BINS <= len(raw) <= MAX_BINS:
        raise MessageError(f"{what} must be a list of {MIN_BINS}..{MAX_BINS} integers")
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise MessageError(f"{what} must hold integers in {low}..{high}")
    return tuple(raw)


def _floats(raw: Any, what: str, *, max_len: int) -> tuple[float, ...]:
    if not isinstance(raw, list) or len(raw) > max_len:
        raise MessageError(f"{what} must be a list of at most {max_len} numbers")
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise MessageError(f"{what} must hold finite numbers")
        out.append(float(v))
    return tuple(out)


def _signal_name(raw: Any, what: str) -> str:
    if not isinstance(raw, str) or not known_signal(raw):
        raise MessageError(f"{what} {str(raw)[:40]!r} is not a known signal")
    return raw


def _parse_signal(raw: Any, i: int) -> SignalSpec:
    if not isinstance(raw, Mapping):
        raise MessageError(f"signals[{i}] must be an object")
    name = _signal_name(raw.get("name"), f"signals[{i}].name")
    edges = _floats(raw.get("edges"), f"signals[{i}].edges", max_len=MAX_BINS - 1)
    counts = _ints(raw.get("counts"), f"signals[{i}].counts")
    if name in CATEGORICAL:
        if edges:
            raise MessageError(f"signal {name!r} is categorical: edges must be empty")
    else:
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise MessageError(f"signal {name!r}: edges must be strictly increasing")
        if len(counts) != len(edges) + 1:
            raise MessageError(f"signal {name!r}: {len(edges)} edges need {len(edges) + 1} counts")
    if sum(counts) < 1:
        raise MessageError(f"signal {name!r}: the reference histogram is empty")
    return SignalSpec(name, edges, counts)


def _parse_pca(raw: Any) -> Pca | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise MessageError("pca must be an object or null")
    features, k = raw.get("features"), raw.get("k")
    for what, v, high in (("features", features, MAX_PCA_FEATURES), ("k", k, MAX_PCA_COMPONENTS)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
            raise MessageError(f"pca.{what} must be an integer in 1..{high}")
    assert isinstance(features, int) and isinstance(k, int)
    mean_b64, comp_b64 = raw.get("mean"), raw.get("components")
    if not isinstance(mean_b64, str) or not isinstance(comp_b64, str):
        raise MessageError("pca.mean and pca.components must be base64 float32 strings")
    mean = decode_input(mean_b64, features).astype(np.float32)
    comps = decode_input(comp_b64, k * features).astype(np.float32).reshape(k, features)
    if not (np.isfinite(mean).all() and np.isfinite(comps).all()):
        raise MessageError("pca holds a non-finite value")
    return Pca(mean, comps)


@dataclass(frozen=True)
class MonitoringReference:
    """What a model expects its traffic to look like (see the module docstring).

    ``input_rows`` and ``holdout_rows`` say how many rows the input and output histograms were
    computed from (each signal's own total is ``sum(counts)``).
    """

    signals: tuple[SignalSpec, ...]
    ink_threshold: float  # input value above which a value counts as ink / foreground
    pca: Pca | None = None
    calibration: Calibration | None = None
    features: int = 0  # values in one input (0: not stated)
    classes: int = 0  # model outputs (0: not stated)
    input_rows: int = 0
    holdout_rows: int = 0

    # ---- encoding ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "features": self.features,
            "classes": self.classes,
            "input_rows": self.input_rows,
            "holdout_rows": self.holdout_rows,
            "ink_threshold": self.ink_threshold,
            "signals": [s.to_dict() for s in self.signals],
            "pca": self.pca.to_dict() if self.pca is not None else None,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
        }

    def to_json(self) -> str:
        """Compact JSON; the same reference always gives the same text (it is signed)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> MonitoringReference:
        """Parse and check a reference (as found in the model's metadata).

        Raises:
            MessageError: over :data:`MAX_REFERENCE_BYTES`, a newer format, an unknown signal,
                malformed edges or counts, a PCA or calibration that does not fit.
        """
        d = loads_bounded(
            data,
            max_bytes=MAX_REFERENCE_BYTES,
            max_depth=MAX_MONITOR_JSON_DEPTH,
            what="monitoring reference",
        )
        if not isinstance(d, Mapping):
            raise MessageError("monitoring reference must be a JSON object")
        version = d.get("v")
        if version != FORMAT_VERSION:
            raise MessageError(f"monitoring reference format {version!r} is not {FORMAT_VERSION}")
        raw_signals = d.get("signals")
        if not isinstance(raw_signals, list) or not 1 <= len(raw_signals) <= MAX_SIGNALS:
            raise MessageError(f"signals must be a list of 1..{MAX_SIGNALS} objects")
        signals = tuple(_parse_signal(s, i) for i, s in enumerate(raw_signals))
        names = [s.name for s in signals]
        if len(set(names)) != len(names):
            raise MessageError("a signal is listed twice")
        ink = _field(d, "ink_threshold", (int, float))
        counts = {
            k: _field(d, k, int) for k in ("features", "classes", "input_rows", "holdout_rows")
        }
        if any(not 0 <= v <= MAX_COUNT for v in counts.values()):
            raise MessageError("features, classes and row counts must be in 0..MAX_COUNT")
        pca = _parse_pca(d.get("pca"))
        for s in signals:
            i = _pc_index(s.name)
            if i is not None and (pca is None or i >= pca.k):
                raise MessageError(f"signal {s.name!r} needs a PCA with more than {i} components")
        if pca is not None and counts["features"] not in (0, pca.features):
            raise MessageError("pca.features differs from the reference's features")
        predicted = next((s for s in signals if s.name == Signal.PREDICTED), None)
        if predicted is not None and counts["classes"] not in (0, predicted.bins):
            raise MessageError("the predicted signal needs one bin per class")
        ref = cls(
            signals=signals,
            ink_threshold=float(ink),
            pca=pca,
            features=counts["features"],
            classes=counts["classes"],
            input_rows=counts["input_rows"],
            holdout_rows=counts["holdout_rows"],
        )
        calibration = _parse_calibration(d.get("calibration"), ref)
        return replace(ref, calibration=calibration)

    # ---- lookups -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.signals)

    def signal(self, name: str) -> SignalSpec:
        """The spec of signal ``name``. Raises KeyError if the reference does not monitor it."""
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def total_bins(self) -> int:
        return sum(s.bins for s in self.signals)

    # ---- the one histogram function, shared by training and devices ---------------------------
    @cached_property
    def _plan(self) -> _Plan:
        return _Plan.of(self)

    def values(self, X: np.ndarray, P: np.ndarray) -> dict[str, np.ndarray]:
        """Each signal's value for a batch: ``X`` the flat inputs ``[n, features]``, ``P`` the
        model's probabilities ``[n, classes]``."""
        return self._plan.values(np.asarray(X, np.float32), np.asarray(P, np.float32))

    def histogram(self, X: np.ndarray, P: np.ndarray) -> dict[str, np.ndarray]:
        """Bin counts (int64) of each signal over a batch (see :meth:`values`)."""
        return self._plan.histogram(np.asarray(X, np.float32), np.asarray(P, np.float32))


def _parse_calibration(raw: Any, ref: MonitoringReference) -> Calibration | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise MessageError("calibration must be an object or null")
    try:
        conf = ref.signal(Signal.CONFIDENCE)
    except KeyError:
        raise MessageError("calibration needs the confidence signal") from None
    rows = _ints(raw.get("rows"), "calibration.rows")
    correct = _ints(raw.get("correct"), "calibration.correct")
    accuracy = _floats(raw.get("accuracy"), "calibration.accuracy", max_len=MAX_BINS)
    labels_raw = raw.get("labels") or []
    labels = _ints(labels_raw, "calibration.labels") if labels_raw else ()
    if not len(rows) == len(correct) == len(accuracy) == conf.bins:
        raise MessageError(f"calibration needs {conf.bins} entries (the confidence bins)")
    if any(c > r for c, r in zip(correct, rows, strict=True)):
        raise MessageError("calibration.correct must not exceed calibration.rows")
    if any(not 0.0 <= a <= 1.0 for a in accuracy):
        raise MessageError("calibration.accuracy must be within 0..1")
    return Calibration(rows, correct, accuracy, labels)


@dataclass(frozen=True)
class _Plan:
    """A reference compiled to numpy arrays: what :meth:`MonitoringReference.histogram` runs."""

    names: tuple[str, ...]
    edges: tuple[np.ndarray | None, ...]  # None: categorical
    bins: tuple[int, ...]
    ink: np.float32
    pca_mean: np.ndarray | None
    pca_t: np.ndarray | None  # components transposed [features, k]

    @classmethod
    def of(cls, ref: MonitoringReference) -> _Plan:
        pca = ref.pca
        return cls(
            names=ref.names,
            edges=tuple(
                None if s.categorical else np.asarray(s.edges, np.float64) for s in ref.signals
            ),
            bins=tuple(s.bins for s in ref.signals),
            ink=np.float32(ref.ink_threshold),
            pca_mean=None if pca is None else pca.mean,
            pca_t=None if pca is None else np.ascontiguousarray(pca.components.T),
        )

    def values(self, X: np.ndarray, P: np.ndarray) -> dict[str, np.ndarray]:
        n = X.shape[0]
        X = X.reshape(n, -1)
        out: dict[str, np.ndarray] = {}
        wanted = set(self.names)
        if wanted & {"confidence", "margin", "predicted"}:
            if P.shape[1] >= 2:
                top2 = -np.partition(-P, 1, axis=1)[:, :2]
                conf, second = top2[:, 0], top2[:, 1]
            else:
                conf, second = P[:, 0], np.zeros(n, np.float32)
            out["confidence"] = conf
            out["margin"] = conf - second
            out["predicted"] = np.argmax(P, axis=1)
        if "input_mean" in wanted or "input_std" in wanted:
            out["input_mean"] = X.mean(axis=1)
            out["input_std"] = X.std(axis=1)
        if "input_ink" in wanted:
            ink = self.ink
            out["input_ink"] = (ink < X).mean(axis=1, dtype=np.float32)
        if self.pca_t is not None and self.pca_mean is not None:
            Z = (X - self.pca_mean) @ self.pca_t
            for i in range(Z.shape[1]):
                out[pc_name(i)] = Z[:, i]
        return {name: out[name] for name in self.names}

    def histogram(self, X: np.ndarray, P: np.ndarray) -> dict[str, np.ndarray]:
        values = self.values(X, P)
        hist = {}
        for name, edges, bins in zip(self.names, self.edges, self.bins, strict=True):
            v = values[name]
            if edges is None:  # categorical; the agent checks the bins match the model's classes
                idx = np.clip(v, 0, bins - 1)
            else:  # NaN sorts last: it lands in the top bin
                idx = np.searchsorted(edges, v, side="right")
            hist[name] = np.bincount(idx, minlength=bins).astype(np.int64)
        return hist


@dataclass(frozen=True)
class MonitorSummary:
    """Device -> server: one period's histogram of every monitored signal for one model.

    ``counts`` maps each signal to its integer bin counts; every signal's counts add up to
    ``samples`` (each inference lands in exactly one bin per signal). ``start``/``end`` are unix
    seconds, device clock.
    """

    device_id: str
    model_line: str
    model_version: int
    start: float
    end: float
    samples: int
    counts: tuple[tuple[str, tuple[int, ...]], ...]  # (signal, bin counts), reference order
    release: int | None = None

    @property
    def histograms(self) -> dict[str, tuple[int, ...]]:
        return dict(self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "model_line": self.model_line,
            "model_version": self.model_version,
            "release": self.release,
            "start": self.start,
            "end": self.end,
            "samples": self.samples,
            "counts": {name: list(c) for name, c in self.counts},
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_dict(cls, data: Any) -> MonitorSummary:
        """Validate a summary (bytes/str are parsed with :data:`MAX_SUMMARY_BYTES`).

        Raises:
            MessageError: a field is missing, malformed or out of bounds, or a signal's counts
                do not add up to ``samples``.
        """
        if isinstance(data, bytes | bytearray | memoryview | str):
            data = loads_bounded(
                data,
                max_bytes=MAX_SUMMARY_BYTES,
                max_depth=MAX_MONITOR_JSON_DEPTH,
                what="monitor summary",
            )
        if not isinstance(data, Mapping):
            raise MessageError("monitor summary must be a JSON object")
        d = data
        version = _field(d, "model_version", int)
        release = _field(d, "release", int, optional=True)
        samples = _field(d, "samples", int)
        if version < 0 or (release is not None and release < 0):
            raise MessageError("model_version and release must be >= 0")
        if not 0 <= samples <= MAX_COUNT:
            raise MessageError(f"samples must be in 0..{MAX_COUNT}")
        start = float(_field(d, "start", (int, float)))
        end = float(_field(d, "end", (int, float)))
        if not 0 <= end - start <= MAX_PERIOD_S or start < 0:
            raise MessageError(f"need 0 <= start <= end <= start + {MAX_PERIOD_S:.0f} s")
        raw = _field(d, "counts", dict)
        if not 1 <= len(raw) <= MAX_SIGNALS:
            raise MessageError(f"counts must hold 1..{MAX_SIGNALS} signals")
        counts = []
        for name, c in raw.items():
            _signal_name(name, "counts key")
            hist = _ints(c, f"counts[{name!r}]", high=samples)
            if sum(hist) != samples:
                raise MessageError(f"counts[{name!r}] add up to {sum(hist)}, not {samples}")
            counts.append((name, hist))
        return cls(
            device_id=_device_id(d),
            model_line=_model_line(d),
            model_version=version,
            release=release,
            start=start,
            end=end,
            samples=samples,
            counts=tuple(counts),
        )

    def check_against(self, reference: MonitoringReference) -> None:
        """Check the summary was made with ``reference``'s bins (what the server does before
        it compares the two).

        Raises:
            MessageError: a signal the reference lacks, or another number of bins.
        """
        for name, hist in self.counts:
            try:
                spec = reference.signal(name)
            except KeyError:
                raise MessageError(f"signal {name!r} is not in the model's reference") from None
            if len(hist) != spec.bins:
                raise MessageError(
                    f"signal {name!r} has {len(hist)} bins, the reference {spec.bins}"
                )


def merge_counts(histograms: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, np.ndarray]:
    """Add up per-signal histograms (summaries of one model from many devices and periods).

    Raises:
        MessageError: a signal's histograms disagree on the number of bins.
    """
    total: dict[str, np.ndarray] = {}
    for hist in histograms:
        for name, c in hist.items():
            arr = np.asarray(c, dtype=np.int64)
            have = total.get(name)
            if have is None:
                total[name] = arr.copy()
            elif have.shape != arr.shape:
                raise MessageError(f"signal {name!r}: {arr.shape[0]} bins, not {have.shape[0]}")
            else:
                have += arr
    return total


__all__ = [
    "CATEGORICAL",
    "FORMAT_VERSION",
    "MAX_BINS",
    "MAX_COUNT",
    "MAX_PCA_COMPONENTS",
    "MAX_PCA_FEATURES",
    "MAX_REFERENCE_BYTES",
    "MAX_SIGNALS",
    "MAX_SUMMARY_BYTES",
    "METADATA_KEY",
    "Calibration",
    "MonitorSummary",
    "MonitoringReference",
    "Pca",
    "Signal",
    "SignalSpec",
    "known_signal",
    "merge_counts",
    "pc_name",
]
