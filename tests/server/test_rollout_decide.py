"""Pure rollout decisions: canary planning and decide()."""

from __future__ import annotations

from server.rollout import (
    Action,
    MetricSummary,
    StageSnapshot,
    Thresholds,
    decide,
    plan_canary,
)

TH = Thresholds(
    min_labelled=50,
    max_accuracy_drop=0.02,
    max_error_rate=0.01,
    max_latency_ratio=2.0,
    latency_slack_ms=1.0,
    canary_min_soak_s=10,
    install_timeout_s=120,
    max_failed_ratio=0.2,
)
GOOD_CONTROL = MetricSummary(inferences=1000, errors=0, labelled=500, correct=450, p95_ms=5.0)


def snap(
    states: dict[str, str],
    *,
    now: float = 1000.0,
    started: float = 900.0,
    installed: float | None = 950.0,
    canary: MetricSummary | None = None,
    control: MetricSummary | None = GOOD_CONTROL,
    baseline: MetricSummary | None = None,
    stage: int = 0,
) -> StageSnapshot:
    return StageSnapshot(
        stage=stage,
        now=now,
        stage_started_at=started,
        device_states=states,
        last_installed_at=installed,
        canary=canary or MetricSummary(),
        control=control,
        baseline=baseline,
    )


def installed(n: int) -> dict[str, str]:
    return {f"d{i}": "committed" for i in range(n)}


def test_plan_canary_is_stable_percentage_and_at_least_one() -> None:
    ids = [f"dev-{i:03d}" for i in range(100)]
    a = plan_canary(7, ids, 20)
    assert len(a) == 20 and a == plan_canary(7, list(reversed(ids)), 20)
    assert plan_canary(8, ids, 20) != a  # another rollout, another canary
    assert len(plan_canary(1, ["only"], 5)) == 1
    assert plan_canary(1, [], 20) == []


def test_advance_when_gates_hold() -> None:
    good = MetricSummary(inferences=200, errors=0, labelled=100, correct=91, p95_ms=6.0)
    d = decide(snap(installed(4), canary=good), TH)
    assert d.action is Action.ADVANCE, d.reason
    assert d.gates["reference"] == "control"


def test_wait_for_evidence() -> None:
    few = MetricSummary(inferences=40, errors=0, labelled=10, correct=10, p95_ms=5.0)
    d = decide(snap(installed(4), canary=few), TH)
    assert d.action is Action.WAIT and "evidence" in d.reason


def test_wait_for_installs_then_soak() -> None:
    states = installed(3) | {"d9": "downloading"}
    assert decide(snap(states), TH).action is Action.WAIT
    good = MetricSummary(inferences=200, errors=0, labelled=100, correct=91, p95_ms=6.0)
    d = decide(snap(installed(4), canary=good, installed=995.0), TH)
    assert d.action is Action.WAIT and "soak" in d.reason


def test_rollback_on_accuracy_drop() -> None:
    bad = MetricSummary(inferences=200, errors=0, labelled=100, correct=80, p95_ms=5.0)
    d = decide(snap(installed(4), canary=bad), TH)
    assert d.action is Action.ROLLBACK and "accuracy" in d.reason


def test_rollback_on_accuracy_drop_against_baseline_without_control() -> None:
    bad = MetricSummary(inferences=200, errors=0, labelled=100, correct=60, p95_ms=5.0)
    base = MetricSummary(inferences=300, errors=0, labelled=150, correct=140, p95_ms=5.0)
    d = decide(snap(installed(2), canary=bad, control=None, baseline=base), TH)
    assert d.action is Action.ROLLBACK and "baseline" in d.reason


def test_rollback_on_error_rate_and_latency() -> None:
    errs = MetricSummary(inferences=200, errors=10, labelled=100, correct=90, p95_ms=5.0)
    assert decide(snap(installed(4), canary=errs), TH).action is Action.ROLLBACK
    slow = MetricSummary(inferences=200, errors=0, labelled=100, correct=90, p95_ms=50.0)
    d = decide(snap(installed(4), canary=slow), TH)
    assert d.action is Action.ROLLBACK and "latency" in d.reason
    # Tiny latencies: 0.1 ms vs 0.04 ms is within the absolute slack, no flapping.
    tiny_ref = MetricSummary(inferences=1000, labelled=500, correct=450, p95_ms=0.04)
    tiny = MetricSummary(inferences=200, labelled=100, correct=90, p95_ms=0.1)
    assert decide(snap(installed(4), canary=tiny, control=tiny_ref), TH).action is Action.ADVANCE


def test_rollback_on_failures() -> None:
    states = {"a": "committed", "b": "refused", "c": "failed", "d": "committed"}
    d = decide(snap(states), TH)
    assert d.action is Action.ROLLBACK and "2 of 4" in d.reason


def test_one_failure_within_ratio_does_not_roll_back() -> None:
    states = installed(9) | {"x": "failed"}
    good = MetricSummary(inferences=200, errors=0, labelled=100, correct=91, p95_ms=6.0)
    assert decide(snap(states, canary=good), TH).action is Action.ADVANCE


def test_install_timeout_marks_devices_and_counts_them_failed() -> None:
    states = installed(3) | {"slow1": "notified", "slow2": "downloading"}
    early = decide(snap(states, now=1000.0, started=950.0), TH)
    assert early.action is Action.WAIT and not early.timed_out
    late = decide(snap(states, now=1100.0, started=950.0), TH)
    assert late.timed_out == ("slow1", "slow2")
    assert late.action is Action.ROLLBACK and "timed out" in late.reason


def test_stage_one_completes_when_everyone_settled() -> None:
    assert decide(snap(installed(5) | {"z": "installing"}, stage=1), TH).action is Action.WAIT
    assert decide(snap(installed(5), stage=1), TH).action is Action.ADVANCE
    assert decide(snap({}, stage=1), TH).action is Action.ADVANCE
    assert decide(snap({}, stage=0), TH).action is Action.WAIT
