"""Pure rollout logic: who is in the canary, and whether a stage waits, advances or rolls back.

Nothing here touches the database, the broker or the clock; the engine
(``server.rollout_engine``) builds a ``StageSnapshot`` and applies the ``Decision``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SUCCESS_STATES = frozenset({"installed", "committed", "already_installed"})
FAILURE_STATES = frozenset({"failed", "refused", "rolled_back", "timed_out"})
TERMINAL_STATES = SUCCESS_STATES | FAILURE_STATES
ACTIVE_ROLLOUT_STATES = ("pending_approval", "canary", "full", "paused")


def canary_order_key(rollout_id: int, device_id: str) -> str:
    """Stable, per-rollout pseudo-random order: a different canary for each rollout."""
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def plan_canary(rollout_id: int, device_ids: Iterable[str], percent: int) -> list[str]:
    """The canary: ``percent`` of the devices (at least one), chosen by stable hashing."""
    ids = sorted(set(device_ids), key=lambda d: canary_order_key(rollout_id, d))
    if not ids:
        return []
    n = max(1, round(len(ids) * percent / 100))
    return sorted(ids[:n])


@dataclass(frozen=True)
class Thresholds:
    min_labelled: int = 50
    max_accuracy_drop: float = 0.02  # absolute accuracy
    max_error_rate: float = 0.01  # errors / inferences
    max_latency_ratio: float = 2.0
    latency_slack_ms: float = 1.0  # ms
    canary_min_soak_s: float = 10.0  # seconds
    install_timeout_s: float = 120.0  # seconds
    max_failed_ratio: float = 0.2


@dataclass(frozen=True)
class MetricSummary:
    """Sums over metric windows; ``p95_ms`` is the inference-weighted mean of window p95s."""

    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    p95_ms: float | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inferences": self.inferences,
            "errors": self.errors,
            "labelled": self.labelled,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "error_rate": self.error_rate,
            "p95_ms": self.p95_ms,
        }


@dataclass(frozen=True)
class StageSnapshot:
    """What the engine knows about one stage at ``now`` (all times in unix seconds)."""

    stage: int  # 0 = canary, 1 = the rest
    now: float
    stage_started_at: float
    device_states: Mapping[str, str]  # device_id -> rollout device state
    last_installed_at: float | None = None  # latest install among the stage's devices
    canary: MetricSummary = field(default_factory=MetricSummary)  # new version, since install
    control: MetricSummary | None = None  # old version on other devices, same period
    baseline: MetricSummary | None = None  # old version on the canary devices, before


class Action(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"  # stage 0 -> full; stage 1 -> completed
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    timed_out: tuple[str, ...] = ()  # devices the engine must mark timed_out
    gates: dict[str, Any] = field(default_factory=dict)


def decide(snap: StageSnapshot, th: Thresholds) -> Decision:
    """Decide what to do with a stage. Rollback conditions are checked before waits.

    Stage 0 (canary) advances when every device installed (or failed within the allowed ratio),
    the canary soaked long enough, has enough labelled evidence, and its accuracy, error rate and
    p95 latency hold against the control group (or, without control traffic, against the canary
    devices' own history on the old version). Stage 1 completes when every device settled.
    """
    states = dict(snap.device_states)
    total = len(states)
    elapsed = snap.now - snap.stage_started_at
    pending = sorted(d for d, s in states.items() if s not in TERMINAL_STATES)
    timed_out: tuple[str, ...] = ()
    if pending and elapsed >= th.install_timeout_s:
        timed_out = tuple(pending)
        for d in pending:
            states[d] = "timed_out"
        pending = []
    failed = sum(1 for s in states.values() if s in FAILURE_STATES)
    gates: dict[str, Any] = {
        "stage": snap.stage,
        "devices": total,
        "pending": len(pending),
        "failed": failed,
        "timed_out": len(timed_out),
    }

    def out(action: Action, reason: str) -> Decision:
        return Decision(action, reason, timed_out, gates)

    if total == 0:
        if snap.stage == 1:
            return out(Action.ADVANCE, "no devices outside the canary")
        return out(Action.WAIT, "no devices in this stage yet")
    failed_ratio = failed / total
    gates["failed_ratio"] = failed_ratio
    if failed_ratio > th.max_failed_ratio:
        return out(
            Action.ROLLBACK,
            f"{failed} of {total} devices in stage {snap.stage} failed, refused or timed out "
            f"({failed_ratio:.0%} > {th.max_failed_ratio:.0%})",
        )
    if snap.stage == 1:
        if pending:
            return out(Action.WAIT, f"waiting for {len(pending)} of {total} devices to install")
        return out(Action.ADVANCE, f"{total - failed} of {total} devices installed")

    canary = snap.canary
    reference, ref_name = snap.control, "control"
    if reference is None or reference.inferences == 0:
        reference, ref_name = snap.baseline, "baseline"
    if reference is not None and reference.inferences == 0:
        reference = None
    gates["canary"] = canary.to_dict()
    gates["reference"] = ref_name if reference is not None else None
    gates["reference_metrics"] = reference.to_dict() if reference is not None else None

    err = canary.error_rate
    if (
        err is not None
        and canary.inferences >= max(th.min_labelled, 1)
        and (err > th.max_error_rate)
    ):
        return out(
            Action.ROLLBACK,
            f"canary error rate {err:.2%} exceeds {th.max_error_rate:.2%} "
            f"over {canary.inferences} inferences",
        )
    enough = canary.labelled >= th.min_labelled
    if enough and reference is not None:
        acc, ref_acc = canary.accuracy, reference.accuracy
        if acc is not None and ref_acc is not None and acc < ref_acc - th.max_accuracy_drop:
            return out(
                Action.ROLLBACK,
                f"canary accuracy {acc:.3f} is below {ref_name} {ref_acc:.3f} by more than "
                f"{th.max_accuracy_drop:.3f} ({canary.labelled} labelled)",
            )
        if canary.p95_ms is not None and reference.p95_ms is not None:
            limit = th.max_latency_ratio * reference.p95_ms + th.latency_slack_ms
            gates["p95_limit_ms"] = limit
            if canary.p95_ms > limit:
                return out(
                    Action.ROLLBACK,
                    f"canary p95 latency {canary.p95_ms:.2f} ms exceeds {limit:.2f} ms "
                    f"({th.max_latency_ratio}x {ref_name} {reference.p95_ms:.2f} ms + slack)",
                )
    if pending:
        return out(Action.WAIT, f"waiting for {len(pending)} of {total} canary devices to install")
    if failed == total:
        return out(Action.ROLLBACK, "no canary device installed the new version")
    if not enough:
        return out(
            Action.WAIT,
            f"waiting for evidence: {canary.labelled} of {th.min_labelled} labelled inferences",
        )
    soak = snap.now - (snap.last_installed_at or snap.stage_started_at)
    gates["soak_s"] = soak
    if soak < th.canary_min_soak_s:
        return out(Action.WAIT, f"soaking: {soak:.0f} of {th.canary_min_soak_s:.0f} s")
    summary = f"canary accuracy {canary.accuracy:.3f} on {canary.labelled} labelled"
    if reference is not None and reference.accuracy is not None:
        summary += f" vs {ref_name} {reference.accuracy:.3f}"
    return out(Action.ADVANCE, f"gates passed: {summary}")
