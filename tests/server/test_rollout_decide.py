"""Pure rollout logic: plans, membership, quality gates and decide() for one wave."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.rollout.decide import Action, DeviceRow, Retries, WaveSnapshot, decide
from server.rollout.gates import GateBounds, MetricSummary, evaluate
from server.rollout.plan import (
    Abort,
    Plan,
    PlanError,
    Wave,
    bucket,
    parse_plan_setting,
    shorthand,
)
from server.rollout.states import state_for_wave

BOUNDS = GateBounds(min_labelled=50, max_accuracy_drop=0.02, accuracy_z=0, max_error_rate=0.01)
RETRIES = Retries(max_retries=2, backoff_s=10)
GOOD_CONTROL = MetricSummary(inferences=1000, errors=0, labelled=500, correct=450, p95_ms=5.0)
GOOD_NEW = MetricSummary(inferences=200, errors=0, labelled=100, correct=91, p95_ms=5.0)
WAVE = Wave(percent=10, success_pct=100, error_pct=20, abort=Abort(50, 2), min_soak_s=10)


def snap(
    states: dict[str, str],
    *,
    now: float = 1000.0,
    started: float = 900.0,
    installed: float = 950.0,
    new: MetricSummary = GOOD_NEW,
    control: MetricSummary | None = GOOD_CONTROL,
    baseline: MetricSummary | None = None,
    wave: Wave = WAVE,
    attempts: int = 0,
    updated: float = 990.0,
    index: int = 0,
    error_override: bool = False,
) -> WaveSnapshot:
    return WaveSnapshot(
        wave=index,
        last_wave=2,
        spec=wave,
        now=now,
        started_at=started,
        devices={
            d: DeviceRow(
                state=s,
                updated_at=updated,
                attempts=attempts,
                installed_at=installed if s == "committed" else None,
            )
            for d, s in states.items()
        },
        new=new,
        control=control,
        baseline=baseline,
        error_override=error_override,
    )


def committed(n: int, **more: str) -> dict[str, str]:
    return {**{f"d{i}": "committed" for i in range(n)}, **more}


# ---------------------------------------------------------------- plans and membership


def test_percent_waves_are_cumulative_exact_on_the_known_fleet_and_stable() -> None:
    plan = Plan((Wave(percent=10), Wave(percent=50), Wave(percent=100)))
    devices = {f"dev-{i:03d}": [] for i in range(40)}
    frozen = plan.frozen(7, devices)
    waves = [frozen.wave_of(7, d, []) for d in devices]
    assert [waves.count(i) for i in range(3)] == [4, 16, 20]
    # A device enrolling later falls into a wave by its hash; nobody else moves.
    again = Plan.from_dict(frozen.to_dict())
    assert [again.wave_of(7, d, []) for d in devices] == waves
    late = again.wave_of(7, "late-device", [])
    assert late == (0 if bucket(7, "late-device") <= frozen.cutoffs[0] else late)
    # Another rollout, another canary.
    other = plan.frozen(8, devices)
    assert [other.wave_of(8, d, []) for d in devices] != waves


def test_small_fleet_canary_has_at_least_one_device() -> None:
    plan = Plan((Wave(percent=5), Wave(percent=100))).frozen(1, {"a": [], "b": [], "c": []})
    assert sorted(plan.wave_of(1, d, []) for d in "abc") == [0, 1, 1]


def test_selector_wave_takes_its_group_first() -> None:
    plan = Plan((Wave(selector=("lab",)), Wave(percent=100))).frozen(1, {"a": ["lab"], "b": []})
    assert plan.wave_of(1, "a", ["lab"]) == 0 and plan.wave_of(1, "b", []) == 1


@pytest.mark.parametrize(
    "waves, message",
    [
        ((), "at least one"),
        ((Wave(percent=50),), "last wave must be percent 100"),
        ((Wave(percent=50), Wave(percent=40), Wave(percent=100)), "cumulative"),
        ((Wave(percent=10, selector=("x",)), Wave(percent=100)), "exactly one"),
        ((Wave(), Wave(percent=100)), "exactly one"),
        ((Wave(percent=10, success_pct=120), Wave(percent=100)), "success_pct"),
    ],
)
def test_invalid_plans_are_refused(waves: tuple[Wave, ...], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Plan(waves)


def test_plan_setting_and_shorthand() -> None:
    d = Wave(success_pct=80)
    waves = parse_plan_setting("10, 50,100", d)
    assert waves is not None and [w.percent for w in waves] == [10, 50, 100]
    assert all(w.success_pct == 80 for w in waves)
    js = parse_plan_setting('[{"selector": {"groups": ["lab"]}}, {"percent": 100}]', d)
    assert js is not None and js[0].selector == ("lab",)
    assert parse_plan_setting("", d) is None
    with pytest.raises(PlanError):
        parse_plan_setting("10,abc", d)
    assert [w.percent for w in shorthand(20, d)] == [20, 100]
    assert state_for_wave(0, 2) == "canary" and state_for_wave(1, 2) == "rolling"
    assert state_for_wave(2, 2) == "full" and state_for_wave(0, 0) == "full"


# ---------------------------------------------------------------- gates


def test_gates_roll_back_on_accuracy_error_rate_and_latency() -> None:
    bad = MetricSummary(inferences=200, errors=0, labelled=100, correct=50, p95_ms=5.0)
    assert not evaluate(bad, GOOD_CONTROL, None, BOUNDS).ok
    errs = replace(GOOD_NEW, errors=10)
    assert "error rate" in evaluate(errs, GOOD_CONTROL, None, BOUNDS).reason
    slow = replace(GOOD_NEW, p95_ms=50.0)
    assert "p95" in evaluate(slow, GOOD_CONTROL, None, BOUNDS).reason


def test_gates_use_baseline_without_control_and_wait_for_evidence() -> None:
    bad = MetricSummary(inferences=200, errors=0, labelled=100, correct=50, p95_ms=5.0)
    res = evaluate(bad, None, GOOD_CONTROL, BOUNDS)
    assert not res.ok and "baseline" in res.reason
    few = MetricSummary(inferences=40, errors=0, labelled=20, correct=20, p95_ms=5.0)
    res = evaluate(few, GOOD_CONTROL, None, BOUNDS)
    assert res.ok and not res.enough and "20 of 50" in res.reason


def test_small_accuracy_dip_needs_significance_when_z_is_set() -> None:
    dip = MetricSummary(inferences=120, errors=0, labelled=60, correct=52, p95_ms=5.0)  # .867
    assert not evaluate(dip, GOOD_CONTROL, None, BOUNDS).ok  # 0.033 drop > 0.02
    assert evaluate(dip, GOOD_CONTROL, None, replace(BOUNDS, accuracy_z=2.0)).ok


# ---------------------------------------------------------------- decide


def test_advance_when_gates_hold_and_wave_soaked() -> None:
    d = decide(snap(committed(2)), BOUNDS, RETRIES)
    assert d.action is Action.ADVANCE and "gates hold" in d.reason


def test_wait_for_installs_evidence_and_soak() -> None:
    d = decide(snap(committed(1, d1="probation")), BOUNDS, RETRIES)
    assert d.action is Action.WAIT and "waiting for 1" in d.reason  # probation is not success
    few = MetricSummary(inferences=20, labelled=10, correct=10, p95_ms=5.0)
    assert "evidence" in decide(snap(committed(2), new=few), BOUNDS, RETRIES).reason
    d = decide(snap(committed(2), now=955.0), BOUNDS, RETRIES)
    assert d.action is Action.WAIT and "soaking" in d.reason


def test_quality_gate_failure_rolls_back() -> None:
    bad = MetricSummary(inferences=200, errors=0, labelled=100, correct=20, p95_ms=5.0)
    d = decide(snap(committed(2), new=bad), BOUNDS, RETRIES)
    assert d.action is Action.ROLLBACK and "quality gate" in d.reason


def test_abort_after_min_devices_rolls_back_error_threshold_pauses() -> None:
    wave = replace(WAVE, abort=Abort(failure_pct=50, min_devices=4), error_pct=20)
    # 1 of 4 rolled back: 25 % > error 20 % -> pause (abort needs 50 %).
    states = committed(3, d3="rolled_back")
    assert decide(snap(states, wave=wave), BOUNDS, RETRIES).action is Action.PAUSE
    # An operator resumed: the error condition is waived for this wave.
    d = decide(snap(states, wave=wave, error_override=True), BOUNDS, RETRIES)
    assert d.action is Action.PAUSE and "below the success threshold" in d.reason
    # 2 of 4 refused or rolled back: abort.
    states = committed(2, d2="rolled_back", d3="refused")
    d = decide(snap(states, wave=wave), BOUNDS, RETRIES)
    assert d.action is Action.ROLLBACK and "2 of 4" in d.reason
    # Fewer settled devices than min_devices: not yet.
    states = {"d0": "refused", "d1": "probation", "d2": "notified", "d3": "downloading"}
    assert decide(snap(states, wave=replace(wave, error_pct=100)), BOUNDS, RETRIES).action is (
        Action.WAIT
    )


def test_timeout_marks_stuck_devices_which_are_retried_after_backoff() -> None:
    d = decide(snap({"a": "downloading", "b": "committed"}, updated=800.0), BOUNDS, RETRIES)
    assert d.timed_out == ("a",) and d.retry == () and d.action is Action.WAIT
    # Failed with retries left: re-sent once its backoff is over, counted as pending.
    s = snap({"a": "failed", "b": "committed"}, updated=995.0)
    assert decide(s, BOUNDS, RETRIES).retry == ()
    s = snap({"a": "failed", "b": "committed"}, updated=980.0)
    assert decide(s, BOUNDS, RETRIES).retry == ("a",)
    # Out of retries: a final failure.
    s = snap({"a": "failed", "b": "committed"}, attempts=2)
    d = decide(s, BOUNDS, RETRIES)
    assert d.retry == () and d.action is Action.ROLLBACK


def test_empty_wave_advances_except_the_first() -> None:
    assert decide(snap({}, index=1), BOUNDS, RETRIES).action is Action.ADVANCE
    assert decide(snap({}), BOUNDS, RETRIES).action is Action.WAIT


def test_quarantined_before_release_is_left_out() -> None:
    s = snap(committed(2))
    devices = dict(s.devices)
    devices["q"] = DeviceRow(state="quarantined", updated_at=900.0, released=False)
    d = decide(replace(s, devices=devices), BOUNDS, RETRIES)
    assert d.action is Action.ADVANCE and d.gates["devices"] == 2
