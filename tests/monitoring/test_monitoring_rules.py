"""Alert rules with hysteresis: raise only after k consecutive breaching windows that each have
enough samples, clear after m clean ones, and let quiet windows count neither way."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.monitoring import MonitoringError
from server.monitoring.drift import SignalScore, WindowVerdict
from server.monitoring.estimate import AccuracyEstimate
from server.monitoring.rules import (
    AlertState,
    AlertThresholds,
    Hysteresis,
    Observation,
    Rule,
    Transition,
    WindowFigures,
    advance,
    observe,
    step,
)

POLICY = Hysteresis(raise_after=2, clear_after=3, min_samples=100)
BREACH, CLEAN, QUIET = Observation(True, 500), Observation(False, 500), Observation(True, 50)


def run(observations: list[Observation], policy: Hysteresis = POLICY) -> list[str | None]:
    state, out = AlertState(), []
    for obs in observations:
        state, change = step(state, obs, policy)
        out.append(change.value if change else None)
    return out


def test_raises_after_k_breaches_and_clears_after_m_clean_windows() -> None:
    seq = [BREACH, BREACH, BREACH, CLEAN, CLEAN, BREACH, CLEAN, CLEAN, CLEAN, BREACH]
    assert run(seq) == [None, "raised", None, None, None, None, None, None, "cleared", None]


def test_an_isolated_breach_never_raises_and_quiet_windows_count_neither_way() -> None:
    assert run([BREACH, CLEAN] * 10) == [None] * 20
    # A window with too few samples neither breaks the streak nor extends it.
    assert run([BREACH, QUIET, QUIET, BREACH]) == [None, None, None, "raised"]
    assert run([QUIET] * 10) == [None] * 10
    state = AlertState(active=True)
    for _ in range(10):
        state, change = step(state, Observation(False, 10), POLICY)
        assert change is None
    assert state.active and state.skipped == 10  # a group gone quiet keeps its alert


@given(st.lists(st.sampled_from([BREACH, CLEAN, QUIET]), max_size=60))
def test_transitions_only_follow_their_streaks(seq: list[Observation]) -> None:
    state = AlertState()
    counted = [o for o in seq if o.samples >= POLICY.min_samples]
    raised = cleared = 0
    for obs in seq:
        before = state
        state, change = step(state, obs, POLICY)
        if change is Transition.RAISED:
            raised += 1
            assert not before.active and state.breaching >= POLICY.raise_after
        if change is Transition.CLEARED:
            cleared += 1
            assert before.active and state.clean >= POLICY.clear_after
    assert raised - cleared == int(state.active)
    assert raised <= sum(o.breach for o in counted) // POLICY.raise_after


def test_advance_keeps_one_state_per_key() -> None:
    key_a, key_b = ("digits", 3, "north", Rule.DRIFT), ("digits", 3, "south", Rule.DRIFT)
    states: dict = {}
    transitions = []
    for _ in range(2):
        states, changes = advance(states, {key_a: BREACH, key_b: CLEAN}, POLICY)
        transitions += changes
    assert transitions == [(key_a, Transition.RAISED)]
    assert states[key_a].active and not states[key_b].active
    states, changes = advance(states, {key_b: BREACH}, {key_b: POLICY})
    assert changes == [] and states[key_a].active  # absent key kept as it was
    with pytest.raises(MonitoringError):
        Hysteresis(raise_after=0)


def test_observe_turns_window_figures_into_rule_observations() -> None:
    verdict = WindowVerdict(
        samples=300, alpha=0.01, scores=(SignalScore("input_std", 0.9, 0.4, 0.3, 0.2),)
    )
    estimate = AccuracyEstimate(0.80, 0.78, 0.82, 300, reference_accuracy=0.95)
    live = AccuracyEstimate(0.70, 0.55, 0.83, 40, reference_accuracy=float("nan"))
    figures = WindowFigures(verdict, estimate, live, inferences=300, errors=6, latency_p95_ms=80)
    obs = observe(figures, AlertThresholds(max_latency_p95_ms=50.0, max_error_rate=0.01))
    assert obs[Rule.DRIFT] == Observation(True, 300, pytest.approx(3.0))
    assert obs[Rule.ESTIMATED_ACCURACY] == Observation(True, 300, 0.80)  # under 0.95 - 0.05
    assert obs[Rule.LIVE_ACCURACY] == Observation(True, 40, 0.70)  # even 0.83 is under 0.90
    assert obs[Rule.LATENCY].breach and obs[Rule.ERROR_RATE].breach
    calm = observe(WindowFigures(inferences=300, errors=1), AlertThresholds())
    assert set(calm) == {Rule.ERROR_RATE} and not calm[Rule.ERROR_RATE].breach
