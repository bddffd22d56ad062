"""Accuracy without labels (CBPE-style) from the confidence histogram, and live accuracy.

Confidence-based performance estimation (NannyML's CBPE): the training pipeline measured, on
the holdout, the accuracy of predictions in each bin of the top-class confidence and made it
monotone (``contract.monitoring.Calibration``). A window's expected accuracy is then the mean of
those per-bin accuracies weighted by the window's own confidence histogram:

    estimate = sum_b count_b * accuracy_b / n

It needs no label and follows covariate shift that moves confidence. It assumes that
P(correct | confidence) is the one measured on the holdout; drift that makes the model
*confidently wrong* (inputs far from anything it saw: accuracy collapses while confidence stays
high) breaks that assumption and the estimate then overstates accuracy. The drift verdict
(:mod:`server.monitoring.drift`) is the alarm for that case: :func:`estimate_trusted` marks the
estimate of a window whose verdict breaches as not to be trusted, and :func:`class_prior_bound`
gives a label-free ceiling when the predicted classes collapse.

Measured (``benchmarks/estimators.py``, digits, the simulator's camera drift, 497 field images):
the estimate is within 2 points of the true accuracy at drift severity 0, 0.25 and 0.5, and 35
and 53 points too high at 0.75 and 1.0 (true 0.28 and 0.16, estimated 0.63 and 0.69: the model's
confidence *rises* from 0.75 to 1.0). No label-free method tried there (ATC, DoC, agreement with
a second model, importance weights from the summaries' histograms) stays within 5 points at
every severity; the drift verdict breaches on every window of those severities.

The interval combines two spreads: the window's own Bernoulli spread around its expected
accuracy (``sum_b count_b * a_b * (1 - a_b) / n**2``) and the calibration's uncertainty
(``a_b * (1 - a_b) / (rows_b + 1)`` per bin, weighted by ``(count_b / n) ** 2``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.monitoring import Calibration
from server.monitoring._errors import MonitoringError

Z_95 = 1.959964  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class AccuracyEstimate:
    """Expected accuracy of a window and its 95 % interval (fractions, 0..1)."""

    accuracy: float
    low: float
    high: float
    samples: int
    reference_accuracy: float  # the holdout's measured accuracy, for comparison

    def to_dict(self) -> dict[str, float | int]:
        return {
            "accuracy": self.accuracy,
            "low": self.low,
            "high": self.high,
            "samples": self.samples,
            "reference_accuracy": self.reference_accuracy,
        }


def reference_accuracy(calibration: Calibration) -> float:
    """The holdout accuracy the calibration was measured at."""
    rows = sum(calibration.rows)
    return sum(calibration.correct) / rows if rows else float("nan")


def estimate_accuracy(
    confidence_counts: Sequence[int] | np.ndarray, calibration: Calibration, *, z: float = Z_95
) -> AccuracyEstimate | None:
    """CBPE-style expected accuracy of a window (see the module docstring); None for an empty
    window.

    Args:
        confidence_counts: the window's histogram of the ``confidence`` signal.
        calibration: the model reference's calibration (same bins).

    Raises:
        MonitoringError: the histogram and the calibration have different bins, or a negative
            count.
    """
    counts = np.asarray(confidence_counts, np.float64)
    acc = np.asarray(calibration.accuracy, np.float64)
    rows = np.asarray(calibration.rows, np.float64)
    if counts.shape != acc.shape:
        raise MonitoringError(f"{counts.size} confidence bins, the calibration has {acc.size}")
    if (counts < 0).any():
        raise MonitoringError("counts must be >= 0")
    n = float(counts.sum())
    if n == 0:
        return None
    share = counts / n
    estimate = float(share @ acc)
    spread = acc * (1.0 - acc)
    var = float(counts @ spread) / n**2 + float((share**2) @ (spread / (rows + 1.0)))
    half = z * math.sqrt(var)
    return AccuracyEstimate(
        accuracy=estimate,
        low=max(0.0, estimate - half),
        high=min(1.0, estimate + half),
        samples=int(n),
        reference_accuracy=reference_accuracy(calibration),
    )


def estimate_trusted(estimated: float | None, drift: Mapping[str, Any] | None) -> bool | None:
    """Whether a window's label-free estimate can be read as its accuracy, from the window's
    drift verdict (``WindowVerdict.to_dict()``, as stored).

    False when the verdict breaches: the inputs moved away from the holdout the calibration was
    measured on, and P(correct | confidence) may have moved with them (a confidently wrong model
    keeps the estimate high). True when the window has the samples a verdict needs and none
    breached. None when there is no estimate, or no verdict to judge it by (not scored, too few
    samples).
    """
    if estimated is None or not drift:
        return None
    if drift.get("breach") is True:
        return False
    if drift.get("enough") is True and drift.get("scores"):
        return True
    return None


def class_prior_bound(
    predicted_counts: Sequence[int] | np.ndarray, label_counts: Sequence[int] | np.ndarray
) -> float | None:
    """Highest accuracy a window can have if its true classes follow the holdout's class mix:
    ``sum_k min(predicted share_k, prior_k)`` (a prediction of class k can only be right as
    often as class k occurs). Label-free; tight when the predicted classes collapse. Sampling
    noise in a small window pulls it down, so read it on large windows. None when empty.

    Raises:
        MonitoringError: the two histograms have different numbers of classes.
    """
    pred = np.asarray(predicted_counts, np.float64)
    prior = np.asarray(label_counts, np.float64)
    if pred.shape != prior.shape:
        raise MonitoringError(f"{pred.size} predicted classes, {prior.size} in the prior")
    if pred.sum() <= 0 or prior.sum() <= 0:
        return None
    return float(np.minimum(pred / pred.sum(), prior / prior.sum()).sum())


def live_accuracy(correct: int, labelled: int, *, z: float = Z_95) -> AccuracyEstimate | None:
    """Accuracy on the labelled traffic of a window with its Wilson 95 % interval; None
    without labels.

    Raises:
        MonitoringError: negative counts or correct > labelled.
    """
    if labelled < 0 or not 0 <= correct <= max(labelled, 0):
        raise MonitoringError(f"need 0 <= correct ({correct}) <= labelled ({labelled})")
    if labelled == 0:
        return None
    p = correct / labelled
    denom = 1 + z**2 / labelled
    centre = (p + z**2 / (2 * labelled)) / denom
    half = z * math.sqrt(p * (1 - p) / labelled + z**2 / (4 * labelled**2)) / denom
    return AccuracyEstimate(
        accuracy=p,
        low=max(0.0, centre - half),
        high=min(1.0, centre + half),
        samples=labelled,
        reference_accuracy=float("nan"),
    )


__all__ = [
    "AccuracyEstimate",
    "class_prior_bound",
    "estimate_accuracy",
    "estimate_trusted",
    "live_accuracy",
    "reference_accuracy",
]
