"""The monitoring reference a model ships with, computed from its data at export time.

:func:`build_reference` turns the training inputs, the holdout and the exported model into a
:class:`contract.monitoring.MonitoringReference`; :func:`embed_reference` puts it in the ONNX
file's ``metadata_props`` (key :data:`contract.monitoring.METADATA_KEY`), inside the bytes the
manifest hashes and the release key signs.

Which rows feed which signal:

- *Input* signals (mean, contrast, ink fraction, principal components) see the training inputs
  and the holdout: they do not depend on the model, and more rows make a tighter reference.
- *Output* signals (confidence, margin, predicted class) and the confidence calibration see the
  holdout only, run through the exported model with ONNX Runtime (what a device runs): a model is
  more confident on rows it was trained on, so training rows would make clean traffic look
  drifted and the accuracy estimate optimistic.

Bin edges are reference quantiles (``bins`` equal-mass bins, so every bin holds rows and PSI is
well defined); the confidence signal also gets the fixed :data:`CONFIDENCE_GRID`, because drift
moves confidence to where the holdout has few rows and the accuracy estimate needs bins there.
The edges are rounded before the histograms are computed with the contract's own function, so a
device that bins the same input gets the same bin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from contract.monitoring import (
    MAX_BINS,
    MAX_PCA_COMPONENTS,
    MAX_PCA_FEATURES,
    METADATA_KEY,
    Calibration,
    MonitoringReference,
    Pca,
    Signal,
    SignalSpec,
    pc_name,
)
from training.errors import ExportError
from training.export import add_metadata

DEFAULT_BINS = 10  # equal-mass bins per continuous signal
PCA_COMPONENTS = 8  # principal components of the input monitored (fewer if the data has fewer)
CONFIDENCE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # fixed confidence edges (probability)
# Pseudo-rows of the "calibrated model" prior per confidence bin: one keeps a bin with one or
# two holdout rows off 0 % and 100 %; more pulls overconfident mid-confidence bins towards their
# confidence (on digits, 4 moved the estimate under moderate drift 3 points too high).
CALIBRATION_PRIOR_ROWS = 1.0
EDGE_DIGITS = 6  # significant digits kept of a bin edge
INPUT_SIGNALS = (Signal.INPUT_MEAN, Signal.INPUT_STD, Signal.INPUT_INK)
OUTPUT_SIGNALS = (Signal.CONFIDENCE, Signal.MARGIN, Signal.PREDICTED)

PredictProba = Callable[[np.ndarray], np.ndarray]  # flat float32 rows -> probabilities [n, C]


def fit_pca(X: np.ndarray, k: int = PCA_COMPONENTS) -> Pca | None:
    """The top-``k`` principal components of ``X`` (numpy SVD), signs fixed so that each
    component's largest-magnitude weight is positive (the same data gives the same bytes).
    None when the input is too wide for a device to project cheaply or has too few rows."""
    X = np.asarray(X, np.float64)
    n, features = X.shape
    k = min(k, MAX_PCA_COMPONENTS, features, n - 1)
    if features > MAX_PCA_FEATURES or k < 1:
        return None
    mean = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    return Pca(mean.astype(np.float32), comps.astype(np.float32))


def _round_edges(values: np.ndarray) -> tuple[float, ...]:
    rounded = sorted({float(f"{v:.{EDGE_DIGITS}g}") for v in values if np.isfinite(v)})
    return tuple(rounded[: MAX_BINS - 1])


def quantile_edges(values: np.ndarray, bins: int) -> tuple[float, ...]:
    """Interior cut points of ``bins`` equal-mass bins of ``values`` (rounded, de-duplicated:
    ties make fewer bins)."""
    qs = np.quantile(np.asarray(values, np.float64), np.arange(1, bins) / bins)
    edges = _round_edges(qs)
    return edges or (float(f"{float(np.median(values)):.{EDGE_DIGITS}g}"),)


def calibrate(
    ref: MonitoringReference,
    confidence: np.ndarray,
    correct: np.ndarray,
    labels: np.ndarray,
    *,
    prior_rows: float = CALIBRATION_PRIOR_ROWS,
) -> Calibration:
    """Per bin of the reference's confidence signal: holdout rows, correct rows, and the
    expected accuracy of a prediction in that bin.

    The expected accuracy is the bin's holdout accuracy shrunk towards the bin's mean confidence
    (what a calibrated model would score) by ``prior_rows`` pseudo-rows, then made monotone in
    confidence (weighted isotonic regression, as NannyML's CBPE calibrates). The shrinkage keeps
    a bin with two holdout rows from claiming 0 % or 100 %: a small holdout has few rows where
    drift moves the confidence.
    """
    from scipy.optimize import isotonic_regression

    spec = ref.signal(Signal.CONFIDENCE)
    edges = np.asarray(spec.edges, np.float64)
    conf = np.asarray(confidence, np.float64)
    idx = np.searchsorted(edges, conf, side="right")
    rows = np.bincount(idx, minlength=spec.bins).astype(np.float64)
    right = np.bincount(idx, weights=np.asarray(correct, np.float64), minlength=spec.bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=spec.bins)
    lows = np.concatenate([[0.0], edges]).clip(0.0, 1.0)
    highs = np.concatenate([edges, [1.0]]).clip(0.0, 1.0)
    prior = np.where(rows > 0, conf_sum / np.maximum(rows, 1.0), (lows + highs) / 2)
    shrunk = (right + prior_rows * prior) / (rows + prior_rows)
    accuracy = isotonic_regression(shrunk, weights=rows + prior_rows, increasing=True).x
    n_classes = ref.classes
    label_counts: Any = (
        np.bincount(labels, minlength=n_classes) if 2 <= n_classes <= MAX_BINS else []
    )
    return Calibration(
        rows=tuple(int(v) for v in rows),
        correct=tuple(int(round(v)) for v in right),
        accuracy=tuple(round(float(a), 6) for a in np.clip(accuracy, 0.0, 1.0)),
        labels=tuple(int(v) for v in label_counts),
    )


def build_reference(
    predict_proba: PredictProba,
    X_train: np.ndarray,
    X_holdout: np.ndarray,
    y_holdout: np.ndarray,
    *,
    n_classes: int,
    value_range: tuple[float, float],
    bins: int = DEFAULT_BINS,
    pca_components: int = PCA_COMPONENTS,
) -> MonitoringReference:
    """Compute a model's monitoring reference (see the module docstring).

    Args:
        predict_proba: the exported model run by ONNX Runtime, on flat float32 rows.
        X_train: flat training inputs ``[n, features]`` (input signals, PCA fit).
        X_holdout, y_holdout: rows never trained on, with labels (all signals, calibration).
        n_classes: the model's outputs.
        value_range: the input spec's (min, max); ink is a value above their middle.
        bins: equal-mass bins per continuous signal.
        pca_components: principal components to monitor (0: none).

    Raises:
        ExportError: no holdout rows, or the model's output does not fit ``n_classes``.
    """
    if len(X_holdout) == 0:
        raise ExportError("a monitoring reference needs holdout rows")
    X_train = np.asarray(X_train, np.float32).reshape(len(X_train), -1)
    X_holdout = np.asarray(X_holdout, np.float32).reshape(len(X_holdout), -1)
    X_inputs = np.concatenate([X_train, X_holdout])
    P = np.asarray(predict_proba(X_holdout), np.float32)
    if P.shape != (len(X_holdout), n_classes):
        raise ExportError(f"the model gives {P.shape} probabilities, expected {n_classes} classes")
    pca = fit_pca(X_train if len(X_train) > 1 else X_inputs, pca_components)
    input_names = [s.value for s in INPUT_SIGNALS]
    input_names += [pc_name(i) for i in range(pca.k if pca is not None else 0)]
    output_names = [Signal.CONFIDENCE.value, Signal.MARGIN.value]
    if 2 <= n_classes <= MAX_BINS:
        output_names.append(Signal.PREDICTED.value)
    names = output_names + input_names
    # A provisional reference (no edges yet) computes the values the edges are cut from.
    draft = MonitoringReference(
        signals=tuple(SignalSpec(n, (), (1,)) for n in names),
        ink_threshold=float(sum(value_range)) / 2,
        pca=pca,
        features=X_inputs.shape[1],
        classes=n_classes,
        input_rows=len(X_inputs),
        holdout_rows=len(X_holdout),
    )
    out_values = draft.values(X_holdout, P)
    in_values = draft.values(X_inputs, np.zeros((len(X_inputs), n_classes), np.float32))
    specs = []
    for name in names:
        if name == Signal.PREDICTED:
            specs.append(SignalSpec(name, (), (0,) * n_classes))
            continue
        values = out_values[name] if name in output_names else in_values[name]
        edges = quantile_edges(values, bins)
        if name == Signal.CONFIDENCE:
            edges = _round_edges(np.concatenate([edges, CONFIDENCE_GRID]))
        specs.append(SignalSpec(name, edges, (0,) * (len(edges) + 1)))
    binned = replace(draft, signals=tuple(specs))
    out_hist = binned.histogram(X_holdout, P)
    in_hist = binned.histogram(X_inputs, np.zeros((len(X_inputs), n_classes), np.float32))
    counted = tuple(
        replace(
            s,
            counts=tuple(int(v) for v in (out_hist if s.name in output_names else in_hist)[s.name]),
        )
        for s in specs
    )
    ref = replace(binned, signals=counted)
    conf = out_values[Signal.CONFIDENCE]
    correct = np.argmax(P, axis=1) == np.asarray(y_holdout)
    return replace(ref, calibration=calibrate(ref, conf, correct, np.asarray(y_holdout, np.int64)))


def embed_reference(onnx_bytes: bytes, reference: MonitoringReference) -> bytes:
    """The model with ``reference`` in its metadata (key :data:`METADATA_KEY`), checked to
    parse back as the contract parser (the agent's) will read it.

    Raises:
        ExportError: the reference does not pass the contract's checks.
    """
    from contract import MessageError

    text = reference.to_json()
    try:
        MonitoringReference.from_json(text)
    except MessageError as exc:
        raise ExportError(f"monitoring reference is invalid: {exc}") from exc
    return add_metadata(onnx_bytes, {METADATA_KEY: text})


__all__ = [
    "CONFIDENCE_GRID",
    "DEFAULT_BINS",
    "PCA_COMPONENTS",
    "build_reference",
    "calibrate",
    "embed_reference",
    "fit_pca",
    "quantile_edges",
]
