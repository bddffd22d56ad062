"""Accuracy without labels: the CBPE-style estimate from the confidence histogram and the
holdout calibration training shipped, against the true accuracy of the real model on the field
pool, clean and drifted with the simulator's torchvision drift."""

from __future__ import annotations

import numpy as np
import pytest

from contract.monitoring import Calibration
from server.monitoring import MonitoringError
from server.monitoring.drift import NullCalibrator, score_window
from server.monitoring.estimate import (
    class_prior_bound,
    estimate_accuracy,
    estimate_trusted,
    live_accuracy,
    reference_accuracy,
)
from tests.monitoring.conftest import Trained, View

CAL = Calibration(rows=(10, 30, 60), correct=(3, 21, 59), accuracy=(0.3, 0.7, 0.98))


def test_estimate_is_the_calibrated_accuracy_weighted_by_the_window() -> None:
    est = estimate_accuracy([10, 0, 30], CAL)
    assert est is not None
    assert est.accuracy == pytest.approx((10 * 0.3 + 30 * 0.98) / 40)
    assert est.low < est.accuracy < est.high and est.samples == 40
    assert est.reference_accuracy == pytest.approx(83 / 100) == reference_accuracy(CAL)
    wide, narrow = estimate_accuracy([1, 2, 5], CAL), estimate_accuracy([100, 200, 500], CAL)
    assert wide is not None and narrow is not None
    assert wide.high - wide.low > narrow.high - narrow.low  # more samples, tighter
    assert estimate_accuracy([0, 0, 0], CAL) is None
    with pytest.raises(MonitoringError, match="2 confidence bins, the calibration has 3"):
        estimate_accuracy([1, 2], CAL)
    with pytest.raises(MonitoringError, match=">= 0"):
        estimate_accuracy([1, -2, 3], CAL)


def test_class_prior_bound_and_live_accuracy() -> None:
    assert class_prior_bound([25, 25, 25, 25], [1, 1, 1, 1]) == pytest.approx(1.0)
    assert class_prior_bound([100, 0, 0, 0], [1, 1, 1, 1]) == pytest.approx(0.25)
    assert class_prior_bound([0, 0], [1, 1]) is None
    with pytest.raises(MonitoringError):
        class_prior_bound([1, 2, 3], [1, 1])
    live = live_accuracy(45, 50)
    assert live is not None and live.accuracy == 0.9 and live.low < 0.9 < live.high < 1.0
    assert live_accuracy(0, 0) is None
    with pytest.raises(MonitoringError):
        live_accuracy(5, 4)


def test_an_estimate_is_trusted_only_under_a_verdict_without_breach() -> None:
    scores = [{"signal": "confidence", "psi": 0.01, "psi_threshold": 0.1}]
    assert estimate_trusted(0.9, {"enough": True, "breach": False, "scores": scores}) is True
    assert estimate_trusted(0.9, {"enough": True, "breach": True, "scores": scores}) is False
    # No estimate, no verdict, no signal scored, or too few samples for a verdict: cannot tell.
    assert estimate_trusted(None, {"enough": True, "breach": False, "scores": scores}) is None
    assert estimate_trusted(0.9, None) is None and estimate_trusted(0.9, {}) is None
    assert estimate_trusted(0.9, {"enough": True, "breach": False, "scores": []}) is None
    assert estimate_trusted(0.9, {"enough": False, "breach": False, "scores": scores}) is None


@pytest.mark.parametrize("severity", [0.0, 0.25, 0.5])
def test_estimate_is_within_5_points_of_true_accuracy(
    trained: Trained, views: dict[float, View], severity: float
) -> None:
    """Clean traffic and the simulator's drift up to half its severity (accuracy 0.98 -> ~0.66):
    the label-free estimate is within 5 points of the accuracy labels would show, both over
    the whole pool and, as a fleet would see it, per window of 200 inferences."""
    view, ref = views[severity], trained.reference
    assert ref.calibration is not None
    est = estimate_accuracy(ref.histogram(view.X, view.P)["confidence"], ref.calibration)
    assert est is not None
    assert abs(est.accuracy - view.accuracy) <= 0.05, (est.accuracy, view.accuracy)
    rng = np.random.default_rng(int(severity * 100))
    ok = view.P.argmax(axis=1) == view.y
    for _ in range(20):
        idx = rng.integers(0, len(view.X), 200)
        w = estimate_accuracy(
            ref.histogram(view.X[idx], view.P[idx])["confidence"], ref.calibration
        )
        assert w is not None and abs(w.accuracy - ok[idx].mean()) <= 0.05 + 2 * w.samples**-0.5


def test_severe_drift_breaks_cbpe_and_the_drift_verdict_and_prior_bound_catch_it(
    trained: Trained, views: dict[float, View]
) -> None:
    """At the simulator's full severity the model is confidently wrong (accuracy ~0.16 at mean
    confidence ~0.78): CBPE's assumption (P(correct | confidence) as on the holdout) fails and
    the estimate overstates accuracy. What still holds: the drift verdict breaches, and the
    class-prior bound is far below the estimate."""
    view, ref = views[1.0], trained.reference
    assert ref.calibration is not None and view.accuracy < 0.3
    hist = ref.histogram(view.X, view.P)
    est = estimate_accuracy(hist["confidence"], ref.calibration)
    bound = class_prior_bound(hist["predicted"], ref.calibration.labels)
    assert est is not None and bound is not None
    assert est.accuracy - view.accuracy > 0.2  # the known limitation, measured
    assert view.accuracy <= bound < est.accuracy - 0.2
    cal = NullCalibrator({s.name: s.counts for s in ref.signals})
    verdict = score_window(cal, hist)
    assert verdict.breach
    assert estimate_trusted(est.accuracy, verdict.to_dict()) is False  # shown as unreliable
