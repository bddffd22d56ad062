"""The champion/challenger gate: pure rules, then real challengers against a real champion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.training.training_testkit import make_samples, spec_dict, write_samples
from training.data import digits_pools, drift
from training.evaluate import gate, model_metrics, score
from training.pipeline import run_job
from training.spec import JobSpec


def _m(golden: float, field: float | None = None) -> dict:
    return {"golden_accuracy": golden, "field_accuracy": field, "field_count": 50}


def test_no_champion_passes_as_initial_model():
    assert gate(_m(0.5), None, 0.03, 0.0) == (True, "initial model (no champion)")


def test_golden_drop_beyond_the_limit_is_rejected_with_the_numbers():
    passed, reason = gate(_m(0.90, 0.99), _m(0.95, 0.50), 0.03, 0.0)
    assert not passed
    assert "golden accuracy 0.9000 vs champion 0.9500" in reason
    assert "floor 0.9200" in reason


def test_golden_drop_within_the_limit_and_exact_ties_pass():
    assert gate(_m(0.93, 0.8), _m(0.95, 0.8), 0.03, 0.0)[0]
    # 0.95 - 0.03 is 0.9199999... in floats; a challenger at exactly the floor passes.
    assert gate(_m(0.92, 0.8), _m(0.95, 0.8), 0.03, 0.0)[0]


def test_field_accuracy_must_gain():
    passed, reason = gate(_m(0.95, 0.70), _m(0.95, 0.72), 0.03, 0.0)
    assert not passed and "field accuracy 0.7000 vs champion 0.7200" in reason
    passed, reason = gate(_m(0.95, 0.75), _m(0.95, 0.72), 0.03, 0.05)
    assert not passed and "needs >= 0.7700" in reason
    passed, reason = gate(_m(0.95, 0.80), _m(0.95, 0.72), 0.03, 0.05)
    assert passed and reason.startswith("passed: ")


def test_without_a_field_set_only_golden_counts():
    passed, reason = gate(_m(0.95), _m(0.95), 0.03, 0.0)
    assert passed and "no field set" in reason


def test_metrics_include_accuracy_and_macro_f1():
    y = np.array([0, 1, 2, 2])
    proba = np.eye(3)[[0, 1, 2, 1]]
    s = score(proba, y, 3)
    assert s["accuracy"] == 0.75
    assert 0.0 < s["macro_f1"] < 1.0
    m = model_metrics(proba, y, None, y[:0], 3)
    assert m["golden_accuracy"] == 0.75 and m["golden_macro_f1"] == s["macro_f1"]
    assert m["field_accuracy"] is None and m["field_macro_f1"] is None and m["field_count"] == 0


@pytest.mark.parametrize("trainer", ["sklearn-mlp", "sklearn-logreg"])
def test_challenger_trained_on_flipped_labels_is_rejected(tmp_path, champion_path, trainer):
    field = digits_pools().field
    flipped = make_samples(field.X, (field.y + 1) % 10, prefix="flip-")
    spec = JobSpec.from_dict(
        spec_dict(
            tmp_path / "out",
            trainer=trainer,
            samples_path=str(write_samples(tmp_path / "s.npz", flipped)),
            champion={"version": 1, "onnx_path": str(champion_path)},
        )
    )
    report = run_job(spec)

    assert report.passed is False
    assert report.reason.startswith("rejected: golden accuracy")
    challenger, champion = report.metrics["challenger"], report.metrics["champion"]
    assert challenger["golden_accuracy"] < champion["golden_accuracy"] - 0.03
    assert f"{challenger['golden_accuracy']:.4f}" in report.reason
    assert f"{champion['golden_accuracy']:.4f}" in report.reason
    # The report is written for a rejected challenger too.
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["passed"] is False and on_disk["reason"] == report.reason


@pytest.mark.parametrize("trainer", ["sklearn-mlp", "torch-cnn"])
def test_challenger_trained_on_drifted_field_samples_passes(tmp_path, champion_path, trainer):
    base = digits_pools().train
    # The fleet's cameras drifted: devices upload rotated, blurred, faded digits.
    drifted = make_samples(drift(base.X[:500], severity=1.0, seed=3), base.y[:500], prefix="d-")
    spec = JobSpec.from_dict(
        spec_dict(
            tmp_path / "out",
            trainer=trainer,
            samples_path=str(write_samples(tmp_path / "s.npz", drifted)),
            champion={"version": 1, "onnx_path": str(champion_path)},
        )
    )
    report = run_job(spec)

    challenger, champion = report.metrics["challenger"], report.metrics["champion"]
    assert report.passed, report.reason
    assert report.dataset["field_eval_count"] > 50
    assert challenger["field_accuracy"] > champion["field_accuracy"] + 0.2
    assert challenger["golden_accuracy"] >= champion["golden_accuracy"] - 0.03
    assert "field accuracy" in report.reason
    assert report.parity["passed"]


# ---------------------------------------------------------------- the full gate


def _full(golden_recall: list[float], support: int = 30, ece: float = 0.02, f1: float = 0.9):
    return {
        "golden_accuracy": 0.9,
        "golden_macro_f1": f1,
        "golden_ece": ece,
        "field_accuracy": None,
        "golden_per_class": [
            {"precision": 0.9, "recall": r, "support": support} for r in golden_recall
        ],
        "field_per_class": [],
    }


def test_a_class_that_regresses_is_rejected_by_name():
    from training.config import GateConfig
    from training.evaluate import evaluate_gate

    verdict = evaluate_gate(
        _full([0.9, 0.6]), _full([0.9, 0.9]), GateConfig(max_class_recall_drop=0.1), ["cat", "dog"]
    )
    assert not verdict.passed
    assert "golden recall of class 'dog' (n=30) 0.6000 vs champion 0.9000" in verdict.reason
    failed = [c for c in verdict.checks if not c["passed"]]
    assert [c["check"] for c in failed] == ["golden recall of class 'dog' (n=30)"]


def test_small_classes_are_skipped_and_the_reason_says_so():
    from training.config import GateConfig
    from training.evaluate import evaluate_gate

    verdict = evaluate_gate(
        _full([0.9, 0.1], support=3), _full([0.9, 0.9], support=3), GateConfig(min_class_count=20)
    )
    assert verdict.passed and "skipped (fewer than 20 examples)" in verdict.reason
    assert any("3 examples < min_class_count 20" in c.get("skipped", "") for c in verdict.checks)


def test_calibration_and_macro_f1_bounds():
    from training.config import GateConfig
    from training.evaluate import evaluate_gate

    worse_ece = evaluate_gate(_full([0.9], ece=0.2), _full([0.9], ece=0.02), GateConfig())
    assert not worse_ece.passed and "golden ECE 0.2000 vs champion 0.0200" in worse_ece.reason
    worse_f1 = evaluate_gate(_full([0.9], f1=0.7), _full([0.9], f1=0.9), GateConfig())
    assert not worse_f1.passed and "golden macro F1" in worse_f1.reason


def test_roc_auc_and_ece_values():
    from training.evaluate import expected_calibration_error, full_score, roc_auc_ovr

    y = np.array([0, 0, 1, 1])
    perfect = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    assert roc_auc_ovr(perfect, y, 2) == 1.0
    # Always 100% confident and always right: no calibration error; 100% sure and half wrong: 0.5.
    assert expected_calibration_error(np.eye(2)[y], y) == 0.0
    assert expected_calibration_error(np.eye(2)[[0, 1, 1, 0]], y) == pytest.approx(0.5)
    s = full_score(perfect, y, 3)
    assert s["per_class"][2] == {"precision": None, "recall": None, "support": 0}
    assert s["per_class"][0]["recall"] == 1.0


def test_flipped_labels_make_a_worse_challenger_that_is_rejected(tmp_path, champion_path):
    field = digits_pools().field
    flipped = make_samples(field.X[:300], (field.y[:300] + 1) % 10, prefix="flip-")
    spec = JobSpec.from_dict(
        spec_dict(
            tmp_path / "out",
            samples_path=str(write_samples(tmp_path / "flip.npz", flipped)),
            champion={"version": 1, "onnx_path": str(champion_path)},
        )
    )
    report = run_job(spec)
    assert not report.passed and report.reason.startswith("rejected: golden accuracy")
    assert report.gate["passed"] is False and report.gate["bounds"]["max_golden_drop"] == 0.03
    failed = {c["check"] for c in report.gate["checks"] if not c["passed"]}
    assert "accuracy" in failed and any("of class" in c for c in failed)
    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    assert stored["reason"] == report.reason
