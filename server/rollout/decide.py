"""Pure rollout logic: what to do with the current wave of a rollout.

Nothing here touches the database, the broker or the clock; the engine
(``server.rollout.engine``) builds a ``WaveSnapshot``, calls ``decide`` and applies the
``Decision`` with guarded updates. Device states live in ``server.rollout.states``, plans and
membership in ``server.rollout.plan``, the quality gates in ``server.rollout.gates``. In a shadow
wave the devices settle in ``shadow`` and the wave is judged by the shadow gate instead of the
served-traffic gates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from server.rollout.gates import (
    GateBounds,
    MetricSummary,
    ShadowSummary,
    evaluate,
    evaluate_shadow,
)
from server.rollout.plan import Wave
from server.rollout.states import (
    FAILURE_STATES,
    IN_PROGRESS_STATES,
    RETRYABLE_STATES,
    SHADOW_STATE,
    SUCCESS_STATES,
    ServerState,
)


@dataclass(frozen=True)
class Retries:
    max_retries: int = 2  # re-sends of the target to a failed or timed-out device
    backoff_s: float = 10.0  # seconds before the first re-send; doubled for each next one

    def due_at(self, failed_at: float, attempts: int) -> float:
        return failed_at + self.backoff_s * (2**attempts)


@dataclass(frozen=True)
class DeviceRow:
    """One device of the current wave as the engine read it (times in unix seconds)."""

    state: str
    updated_at: float
    attempts: int = 0  # re-sends so far
    installed_at: float | None = None  # when it committed (server clock)
    released: bool = True  # was sent the new release (False: held out before its wave)


@dataclass(frozen=True)
class WaveSnapshot:
    """What the engine knows about the running wave at ``now``."""

    wave: int
    last_wave: int
    spec: Wave
    now: float
    started_at: float
    devices: Mapping[str, DeviceRow]
    new: MetricSummary = field(default_factory=MetricSummary)  # new version, all waves
    control: MetricSummary | None = None  # old version, any device, since approval
    baseline: MetricSummary | None = None  # old version on rollout devices, before approval
    error_override: bool = False  # an operator resumed after this wave's error pause
    class_names: tuple[str, ...] = ()  # the line's labels, to name classes in gate reasons
    shadow: ShadowSummary | None = None  # a shadow wave's figures (challenger beside champion)


class Action(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"  # start the next wave (or complete after the last)
    PAUSE = "pause"  # error condition: a human decides
    ROLLBACK = "rollback"  # abort criteria or a failed quality gate


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    timed_out: tuple[str, ...] = ()  # devices the engine must mark timed_out
    retry: tuple[str, ...] = ()  # devices whose target the engine must re-send now
    gates: dict[str, Any] = field(default_factory=dict)


def decide(snap: WaveSnapshot, bounds: GateBounds, retries: Retries) -> Decision:
    """Decide what to do with the running wave. Rollback beats pause beats waiting.

    Order: per-device timeouts and due retries; abort criteria (roll back); error condition
    (pause); quality gates on all new-version traffic (roll back on a failed gate); success
    condition; evidence; soak. An empty wave (small fleet) advances at once, except the first.
    """
    w = snap.spec
    states: dict[str, str] = {}
    timed_out: list[str] = []
    for d, row in snap.devices.items():
        state = row.state
        if state in IN_PROGRESS_STATES and snap.now - row.updated_at >= w.timeout_s:
            timed_out.append(d)
            state = ServerState.TIMED_OUT
        states[d] = state
    retry = sorted(
        d
        for d, s in states.items()
        if s in RETRYABLE_STATES
        and d not in timed_out
        and snap.devices[d].attempts < retries.max_retries
        and snap.now >= retries.due_at(snap.devices[d].updated_at, snap.devices[d].attempts)
    )
    counted = {
        d: s for d, s in states.items() if s != ServerState.QUARANTINED or snap.devices[d].released
    }
    total = len(counted)
    settled_ok = SUCCESS_STATES | {SHADOW_STATE} if w.kind == "shadow" else SUCCESS_STATES
    ok = sum(1 for s in counted.values() if s in settled_ok)
    final = sorted(
        d
        for d, s in counted.items()
        if s == ServerState.QUARANTINED
        or (
            s in FAILURE_STATES
            and not (s in RETRYABLE_STATES and snap.devices[d].attempts < retries.max_retries)
        )
    )
    waiting_retry = sum(1 for d, s in counted.items() if s in RETRYABLE_STATES and d not in final)
    pending = total - ok - len(final)
    gates: dict[str, Any] = {
        "wave": snap.wave,
        "devices": total,
        "committed": ok,
        "failed": len(final),
        "pending": pending,
        "retrying": waiting_retry,
        "timed_out_now": len(timed_out),
    }

    def out(action: Action, reason: str) -> Decision:
        return Decision(action, reason, tuple(sorted(timed_out)), tuple(retry), gates)

    label = f"wave {snap.wave + 1} ({w.label})"
    if total == 0:
        if snap.wave == 0:
            return out(Action.WAIT, f"{label}: no devices yet")
        return out(Action.ADVANCE, f"{label} has no devices")
    failed_pct = 100 * len(final) / total
    gates["failed_pct"] = failed_pct
    settled = ok + len(final)
    if final and settled >= w.abort.min_devices and failed_pct >= w.abort.failure_pct:
        return out(
            Action.ROLLBACK,
            f"{label}: {len(final)} of {total} devices failed, refused, rolled back or timed "
            f"out ({failed_pct:.0f}% >= abort {w.abort.failure_pct:g}%)",
        )
    if failed_pct > w.error_pct and not snap.error_override:
        return out(
            Action.PAUSE,
            f"{label}: {len(final)} of {total} devices failed ({failed_pct:.0f}% > error "
            f"threshold {w.error_pct:g}%); resume or roll back",
        )
    if w.kind == "shadow":
        gate = evaluate_shadow(snap.shadow or ShadowSummary(), bounds, snap.class_names)
    else:
        gate = evaluate(snap.new, snap.control, snap.baseline, bounds, snap.class_names)
    gates["quality"] = gate.detail
    if not gate.ok:
        return out(Action.ROLLBACK, f"{label}: quality gate failed: {gate.reason}")
    ok_pct = 100 * ok / total
    gates["committed_pct"] = ok_pct
    if ok_pct < w.success_pct:
        if pending == 0:
            return out(
                Action.PAUSE,
                f"{label} settled with {ok_pct:.0f}% committed, below the success threshold "
                f"{w.success_pct:g}%; resume to accept or roll back",
            )
        return out(
            Action.WAIT,
            f"{label}: {ok} of {total} committed, waiting for {pending} "
            f"(success at {w.success_pct:g}%)",
        )
    if not gate.enough:
        return out(Action.WAIT, f"{label}: {gate.reason}")
    need = max(1, -(-int(w.success_pct * total) // 100))
    installs = sorted(
        snap.devices[d].installed_at or snap.now for d, s in counted.items() if s in settled_ok
    )
    reached = max(snap.started_at, installs[min(need, len(installs)) - 1])
    # A commit stamped after the snapshot's clock was read (the ingest writer and the engine
    # read the clock separately) has soaked 0 s, not a negative time to wait out.
    soak = max(0.0, snap.now - reached)
    gates["soak_s"] = soak
    if soak < w.min_soak_s:
        return out(Action.WAIT, f"{label}: soaking {soak:.0f} of {w.min_soak_s:g} s")
    return out(Action.ADVANCE, f"{label}: {ok} of {total} committed; {gate.reason}")


def wave_counts(states: Sequence[tuple[int, str]]) -> dict[int, dict[str, int]]:
    """(wave, state) pairs -> wave -> state -> count."""
    out: dict[int, dict[str, int]] = {}
    for wave, state in states:
        bucket = out.setdefault(wave, {})
        bucket[state] = bucket.get(state, 0) + 1
    return out
