"""Per-class recall and shadow gates (pure), and the per-class/shadow fields of MetricsReport."""

from __future__ import annotations

import json

import pytest

from contract import MessageError, MetricsReport
from contract.messages import MAX_CLASS_ENTRIES, ClassCount, ShadowFigures
from server.rollout.gates import (
    GateBounds,
    MetricSummary,
    ShadowSummary,
    class_recall_gate,
    evaluate,
    evaluate_shadow,
)

BOUNDS = GateBounds(
    min_labelled=50,
    max_accuracy_drop=0.05,
    accuracy_z=2.0,
    max_error_rate=0.01,
    min_class_support=20,
    max_class_recall_drop=0.10,
)
NAMES = tuple(str(i) for i in range(10))


def summary(classes: dict[int, tuple[int, int]], inferences: int | None = None) -> MetricSummary:
    labelled = sum(n for n, _ in classes.values())
    correct = sum(ok for _, ok in classes.values())
    return MetricSummary(
        inferences=inferences or 2 * labelled,
        labelled=labelled,
        correct=correct,
        p95_ms=5.0,
        classes=classes,
    )


# The champion: 90% recall on each of 10 classes, 100 samples each.
CHAMPION = summary({c: (100, 90) for c in range(10)})


def test_a_model_fine_on_average_but_destroying_one_class_is_stopped() -> None:
    # Class 3 collapses to 10% recall; the others improve to 97%: overall accuracy 88.3%,
    # within the 5-point accuracy bound of the champion's 90%.
    new = summary({c: (60, 6) if c == 3 else (60, 58) for c in range(10)})
    assert CHAMPION.accuracy is not None and new.accuracy is not None
    assert CHAMPION.accuracy - new.accuracy < BOUNDS.max_accuracy_drop
    res = evaluate(new, CHAMPION, None, BOUNDS, NAMES)
    assert not res.ok and res.enough
    assert res.reason.startswith("per-class recall: class 3 ('3') recall 0.100 (6/60)")
    assert "reference 0.900 (90/100)" in res.reason and "more than 0.100" in res.reason
    worst = res.detail["class_recall"][0]
    assert worst["label"] == 3 and worst["support"] == 60 and worst["reference_support"] == 100
    # Without per-class counts (an old agent) the same totals pass the accuracy gate.
    blind = MetricSummary(inferences=1200, labelled=600, correct=new.correct, p95_ms=5.0)
    assert evaluate(blind, CHAMPION, None, BOUNDS).ok


def test_noise_within_the_bound_passes() -> None:
    # Every class a few points off the champion (the largest drop 0.083 < 0.10).
    new = summary({c: (60, 50 + (c % 3) * 2) for c in range(10)})
    res = evaluate(new, CHAMPION, None, BOUNDS, NAMES)
    assert res.ok and res.enough, res.reason
    assert max(r["drop"] for r in res.detail["class_recall"]) < BOUNDS.max_class_recall_drop


def test_an_insignificant_drop_beyond_the_bound_passes() -> None:
    # 20 samples at 75% vs 90%: beyond the bound but z < 2 (could be chance).
    ref = summary({0: (40, 36), 1: (200, 180)})
    new = summary({0: (20, 15), 1: (200, 181)})
    verdict = class_recall_gate(new.classes, ref.classes, BOUNDS)
    assert verdict.failed is None and verdict.suspect is None
    assert verdict.detail[0]["z"] < BOUNDS.accuracy_z


def test_too_little_evidence_waits() -> None:
    # Too few labelled overall: wait, whatever the classes look like.
    few = summary({0: (10, 0), 1: (10, 10)})
    res = evaluate(few, CHAMPION, None, BOUNDS, NAMES)
    assert res.ok and not res.enough
    assert res.reason == "waiting for evidence: 20 of 50 labelled inferences"
    # Enough overall, but the one class that looks regressed has 8 of 20 samples needed: wait
    # (neither fail on thin evidence nor pass a possible regression).
    new = summary({0: (8, 1), **{c: (60, 55) for c in range(1, 10)}})
    res = evaluate(new, CHAMPION, None, BOUNDS, NAMES)
    assert res.ok and not res.enough
    assert "class 0 ('0') recall 0.125 (1/8)" in res.reason and "8 of 20 samples" in res.reason
    # Thin reference evidence (a shadow wave: both sides saw the same 5 inputs) waits too.
    thin = {0: (5, 5), 1: (100, 90)}
    verdict = class_recall_gate({0: (5, 0), 1: (100, 90)}, thin, BOUNDS)
    assert verdict.failed is None and verdict.suspect is not None
    assert "class 0 recall 0.000 (0/5)" in verdict.suspect and "5 of 20" in verdict.suspect
    # A class that looks fine on thin evidence holds nothing up.
    verdict = class_recall_gate({0: (5, 5), 1: (100, 90)}, thin, BOUNDS)
    assert verdict.failed is None and verdict.suspect is None


def test_the_class_gate_uses_the_same_reference_as_accuracy() -> None:
    # No control traffic: the rollout devices' own history (baseline) is the reference.
    new = summary({0: (30, 3), 1: (170, 170)})  # accuracy 0.865, above the baseline's
    baseline = summary({0: (100, 95), 1: (100, 50)})  # accuracy 0.725
    res = evaluate(new, None, baseline, BOUNDS)
    assert res.detail["reference"] == "baseline"
    assert not res.ok and "class 0 recall 0.100 (3/30)" in res.reason


def test_shadow_gate_passes_a_better_challenger_and_reports_agreement() -> None:
    good = ShadowSummary(
        compared=400,
        agreed=300,
        labelled=200,
        champion_correct=120,
        challenger_correct=190,
        challenger_classes={0: (100, 95), 1: (100, 95)},
        champion_classes={0: (100, 60), 1: (100, 60)},
    )
    res = evaluate_shadow(good, BOUNDS)
    assert res.ok and res.enough
    assert "challenger accuracy 0.950 vs champion 0.600" in res.reason
    assert "agreement 0.750 on 400 inputs" in res.reason
    assert res.detail["shadow"]["agreement"] == 0.75


def test_shadow_gate_stops_a_worse_challenger_and_a_class_killer() -> None:
    flipped = ShadowSummary(
        compared=200, agreed=20, labelled=100, champion_correct=90, challenger_correct=5
    )
    res = evaluate_shadow(flipped, BOUNDS)
    assert not res.ok and "challenger accuracy 0.050 is below the champion's 0.900" in res.reason
    killer = ShadowSummary(
        compared=200,
        agreed=150,
        labelled=200,
        champion_correct=180,
        challenger_correct=176,
        challenger_classes={0: (100, 80), 1: (100, 96)},
        champion_classes={0: (100, 95), 1: (100, 85)},
    )
    res = evaluate_shadow(killer, BOUNDS, ("cat", "dog"))
    assert not res.ok and "class 0 ('cat') recall 0.800 (80/100)" in res.reason


def test_shadow_gate_waits_for_labelled_evidence_and_checks_challenger_errors() -> None:
    res = evaluate_shadow(ShadowSummary(compared=30, agreed=30, labelled=10), BOUNDS)
    assert res.ok and not res.enough and "10 of 50 labelled" in res.reason
    res = evaluate_shadow(ShadowSummary(compared=90, agreed=90, labelled=90, errors=10), BOUNDS)
    assert not res.ok and "failed on 10 of 100 inputs" in res.reason


# ---- the wire format ------------------------------------------------------------------------


def report(**extra: object) -> dict:
    base = MetricsReport(
        device_id="cam-1",
        ts=1.0,
        model_line="digits",
        model_version=2,
        window_s=5.0,
        inferences=100,
        errors=0,
        labelled=50,
        correct=40,
        latency_ms_p50=1.0,
        latency_ms_p95=2.0,
    ).to_dict()
    base.update(extra)
    return base


def test_metrics_report_round_trips_class_counts_and_shadow_figures() -> None:
    shadow = ShadowFigures(
        model_version=3,
        compared=100,
        agreed=80,
        labelled=50,
        champion_correct=40,
        challenger_correct=45,
        class_counts=(ClassCount(0, 25, 24), ClassCount(1, 25, 21)),
        champion_class_counts=(ClassCount(0, 25, 20), ClassCount(1, 25, 20)),
    )
    original = MetricsReport.from_dict(
        report(class_counts=[{"label": 0, "support": 30, "correct": 25, "predicted": 28}])
    )
    original = MetricsReport(**{**original.__dict__, "shadow": shadow})
    parsed = MetricsReport.from_dict(original.to_json())
    assert parsed == original and parsed.shadow == shadow
    assert parsed.class_counts == (ClassCount(0, 30, 25, 28),)
    # An old agent's report (no new fields) still parses, with none.
    old = report()
    del old["class_counts"], old["shadow"]
    legacy = MetricsReport.from_dict(json.dumps(old))
    assert legacy.class_counts == () and legacy.shadow is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"class_counts": {"0": 3}}, "field 'class_counts' must be list"),
        ({"class_counts": [[0, 1, 1]]}, "class_counts[0] must be an object"),
        ({"class_counts": [{"label": 0, "support": 5}]}, "missing field 'correct'"),
        ({"class_counts": [{"label": 0, "support": 5, "correct": 6}]}, "correct <= support"),
        (
            {"class_counts": [{"label": 0, "support": 5, "correct": 1, "predicted": -1}]},
            "predicted >= 0",
        ),
        (
            {"class_counts": [{"label": 0, "support": 5, "correct": 1, "predicted": 51}]},
            "add up to more than the labelled/correct totals",
        ),
        ({"class_counts": [{"label": -1, "support": 5, "correct": 1}]}, "label must be 0.."),
        (
            {"class_counts": [{"label": 1, "support": 5, "correct": 1}] * 2},
            "lists label 1 twice",
        ),
        (
            {"class_counts": [{"label": 0, "support": 51, "correct": 1}]},
            "add up to more than the labelled/correct totals",
        ),
        (
            {
                "class_counts": [
                    {"label": i, "support": 0, "correct": 0} for i in range(MAX_CLASS_ENTRIES + 1)
                ]
            },
            f"limit {MAX_CLASS_ENTRIES}",
        ),
        ({"shadow": []}, "field 'shadow' must be an object"),
        (
            {
                "shadow": {
                    "model_version": 3,
                    "compared": 5,
                    "agreed": 6,
                    "labelled": 0,
                    "champion_correct": 0,
                    "challenger_correct": 0,
                }
            },
            "agreed must not exceed compared",
        ),
        (
            {
                "shadow": {
                    "model_version": 3,
                    "compared": 5,
                    "agreed": 5,
                    "labelled": 2,
                    "champion_correct": 0,
                    "challenger_correct": 3,
                }
            },
            "must not exceed labelled",
        ),
    ],
)
def test_bad_class_counts_and_shadow_figures_are_refused_with_a_reason(
    extra: dict, message: str
) -> None:
    with pytest.raises(MessageError) as err:
        MetricsReport.from_dict(report(**extra))
    assert message in str(err.value)


def test_a_recall_drop_bought_back_in_precision_is_excused() -> None:
    # A champion collapsed under drift puts most inputs in class 4: recall 0.98 there, precision
    # 0.12. The challenger fixes the collapse: recall on 4 falls to 0.35 but F1 on 4 rises.
    champion = {c: (50, 49 if c == 4 else 5, 400 if c == 4 else 10) for c in range(10)}
    challenger = {c: (50, 17 if c == 4 else 40, 20 if c == 4 else 53) for c in range(10)}
    verdict = class_recall_gate(challenger, champion, BOUNDS)
    assert verdict.failed is None and verdict.suspect is None
    row = next(r for r in verdict.detail if r["label"] == 4)
    assert row["drop"] > 0.6 and row["f1"] > row["reference_f1"] and "excused" in row
    # The same recall drop without predicted counts (older agents) fails as before.
    plain = {c: v[:2] for c, v in champion.items()}
    assert class_recall_gate({c: v[:2] for c, v in challenger.items()}, plain, BOUNDS).failed
    # A challenger that simply stops predicting a class is not excused: its F1 falls to 0.
    killer = {c: (50, 0, 0) if c == 3 else (50, 47, 55) for c in range(10)}
    healthy = {c: (50, 45, 50) for c in range(10)}
    verdict = class_recall_gate(killer, healthy, BOUNDS, NAMES)
    assert verdict.failed is not None and verdict.failed.startswith("class 3 ('3') recall 0.000")


def test_ten_classes_do_not_give_a_good_model_ten_chances_to_fail_by_noise() -> None:
    # Seen on a real fleet: a good model, one class at 16/20 against 54/56 (z = 2.3). Alone that
    # passes a z >= 2.0 test; judged with nine other classes it is noise (Bonferroni: z >= 2.84
    # needed), while a class that really collapsed still fails.
    healthy = {c: (50, 48) for c in range(10)}
    reference = {**healthy, 8: (56, 54)}
    noisy = {**{c: (20, 20) for c in range(10)}, 8: (20, 16)}
    verdict = class_recall_gate(noisy, reference, BOUNDS, NAMES)
    assert verdict.failed is None
    row = next(r for r in verdict.detail if r["label"] == 8)
    assert row["drop"] > 0.1 and 2.0 < row["z"] < 2.84
    collapsed = {**noisy, 8: (20, 6)}
    failed = class_recall_gate(collapsed, reference, BOUNDS, NAMES).failed
    assert failed is not None and "class 8" in failed and "2.84 needed" in failed
