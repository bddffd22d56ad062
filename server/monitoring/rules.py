"""Alert rules with hysteresis: a pure state machine over per-window observations.

Each rule (:class:`Rule`) turns a window's figures into an :class:`Observation` (breach or
clean, on how many samples). An alert is *raised* after ``raise_after`` (k) consecutive breaching
windows and *cleared* after ``clear_after`` (m) consecutive clean ones (:class:`Hysteresis`). A
window with fewer than ``min_samples`` samples counts neither way: it does not extend a streak
and does not break one, so a group that goes quiet neither raises nor clears an alert.

Why k windows: a drift verdict breaches an unchanged window with probability at most ``alpha``
(:mod:`server.monitoring.drift`), so k consecutive breaches of independent unchanged windows
happen with probability about ``alpha ** k`` per window: 1e-4 for alpha = 0.01 and k = 2. Drift
that breaches every window raises after exactly k windows; clearing needs m clean windows so an
alert does not flap on a drift that comes and goes.

Nothing here stores state: :func:`step` and :func:`advance` take states and return new ones with
the transitions, so the caller persists them (one row per alert key) and acts on transitions.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar

from server.monitoring._errors import MonitoringError
from server.monitoring.drift import WindowVerdict
from server.monitoring.estimate import AccuracyEstimate

K = TypeVar("K", bound=Hashable)


class Rule(StrEnum):
    """What an alert is about."""

    DRIFT = "drift"  # some signal's histogram over its calibrated threshold
    ESTIMATED_ACCURACY = "estimated_accuracy"  # label-free estimate below the floor
    LIVE_ACCURACY = "live_accuracy"  # labelled accuracy (upper Wilson bound) below the floor
    LATENCY = "latency"  # p95 latency over its bound
    ERROR_RATE = "error_rate"  # failed inferences over their bound


class Transition(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"


@dataclass(frozen=True)
class Hysteresis:
    """When a rule's alert raises and clears."""

    raise_after: int = 2  # k: consecutive breaching windows that raise the alert
    clear_after: int = 3  # m: consecutive clean windows that clear it
    min_samples: int = 100  # samples (inferences, or labels for live accuracy) a window needs

    def __post_init__(self) -> None:
        if self.raise_after < 1 or self.clear_after < 1 or self.min_samples < 1:
            raise MonitoringError("raise_after, clear_after and min_samples must be >= 1")


DEFAULT_POLICIES: Mapping[Rule, Hysteresis] = {
    Rule.DRIFT: Hysteresis(raise_after=2, clear_after=3, min_samples=100),
    Rule.ESTIMATED_ACCURACY: Hysteresis(raise_after=2, clear_after=3, min_samples=100),
    Rule.LIVE_ACCURACY: Hysteresis(raise_after=2, clear_after=3, min_samples=30),
    Rule.LATENCY: Hysteresis(raise_after=3, clear_after=3, min_samples=100),
    Rule.ERROR_RATE: Hysteresis(raise_after=2, clear_after=3, min_samples=100),
}


@dataclass(frozen=True)
class Observation:
    """One window as one rule sees it."""

    breach: bool
    samples: int
    value: float | None = None  # the figure judged (PSI ratio, accuracy, ms, rate)


@dataclass(frozen=True)
class AlertState:
    """Where one alert stands (persist it per key: rule, model version, device group)."""

    active: bool = False
    breaching: int = 0  # consecutive breaching windows (with enough samples)
    clean: int = 0  # consecutive clean windows (with enough samples)
    skipped: int = 0  # windows with too few samples, in total


def step(
    state: AlertState, obs: Observation, policy: Hysteresis
) -> tuple[AlertState, Transition | None]:
    """Advance one alert by one window; the transition if it raised or cleared."""
    if obs.samples < policy.min_samples:
        return replace(state, skipped=state.skipped + 1), None
    if obs.breach:
        breaching = state.breaching + 1
        if not state.active and breaching >= policy.raise_after:
            return replace(state, active=True, breaching=breaching, clean=0), Transition.RAISED
        return replace(state, breaching=breaching, clean=0), None
    clean = state.clean + 1
    if state.active and clean >= policy.clear_after:
        return replace(state, active=False, breaching=0, clean=clean), Transition.CLEARED
    return replace(state, breaching=0, clean=clean), None


def advance(
    states: Mapping[K, AlertState],
    observations: Mapping[K, Observation],
    policy_of: Mapping[K, Hysteresis] | Hysteresis,
) -> tuple[dict[K, AlertState], list[tuple[K, Transition]]]:
    """Advance every observed alert by one window (keys absent from ``observations`` keep
    their state). ``policy_of`` is one policy for all keys or one per key."""
    out = dict(states)
    transitions: list[tuple[K, Transition]] = []
    for key, obs in observations.items():
        policy = policy_of if isinstance(policy_of, Hysteresis) else policy_of[key]
        out[key], change = step(states.get(key, AlertState()), obs, policy)
        if change is not None:
            transitions.append((key, change))
    return out, transitions


@dataclass(frozen=True)
class AlertThresholds:
    """The bounds the rules hold a window to."""

    max_accuracy_drop: float = 0.05  # accuracy below the reference's minus this breaches
    max_latency_p95_ms: float = 50.0  # milliseconds
    max_error_rate: float = 0.01  # failed inferences / inferences


@dataclass(frozen=True)
class WindowFigures:
    """What the server knows of one window (one model version, device group, time window)."""

    drift: WindowVerdict | None = None
    estimate: AccuracyEstimate | None = None
    live: AccuracyEstimate | None = None  # from labelled traffic (MetricsReport), if any
    inferences: int = 0
    errors: int = 0
    latency_p95_ms: float | None = None


def observe(figures: WindowFigures, bounds: AlertThresholds) -> dict[Rule, Observation]:
    """Each rule's observation of a window; a rule without the figure it needs is absent.

    The accuracy floor is the reference's holdout accuracy minus ``max_accuracy_drop``. The
    estimate breaches when its point value is under the floor (it is precise: a few tenths of a
    point on a window of hundreds); live accuracy when even its upper 95 % bound is (a window has
    few labels).
    """
    out: dict[Rule, Observation] = {}
    if figures.drift is not None:
        d = figures.drift
        ratio = max((s.psi / max(s.psi_threshold, 1e-12) for s in d.scores), default=0.0)
        out[Rule.DRIFT] = Observation(d.breach, d.samples, ratio)
    est = figures.estimate
    if est is not None and math.isfinite(est.reference_accuracy):
        floor = est.reference_accuracy - bounds.max_accuracy_drop
        out[Rule.ESTIMATED_ACCURACY] = Observation(est.accuracy < floor, est.samples, est.accuracy)
    live = figures.live
    if live is not None and est is not None and math.isfinite(est.reference_accuracy):
        floor = est.reference_accuracy - bounds.max_accuracy_drop
        out[Rule.LIVE_ACCURACY] = Observation(live.high < floor, live.samples, live.accuracy)
    if figures.latency_p95_ms is not None:
        out[Rule.LATENCY] = Observation(
            figures.latency_p95_ms > bounds.max_latency_p95_ms,
            figures.inferences,
            figures.latency_p95_ms,
        )
    if figures.inferences > 0:
        rate = figures.errors / figures.inferences
        out[Rule.ERROR_RATE] = Observation(rate > bounds.max_error_rate, figures.inferences, rate)
    return out


__all__ = [
    "DEFAULT_POLICIES",
    "AlertState",
    "AlertThresholds",
    "Hysteresis",
    "Observation",
    "Rule",
    "Transition",
    "WindowFigures",
    "advance",
    "observe",
    "step",
]
