"""Where a device stands in a rollout (``rollout_devices.state``), and where a rollout stands.

A member's state is either what its device reported (:class:`contract.DeviceState`, the wire
vocabulary the agent sends) or one of the few only the server sets (:class:`ServerState`)::

    queued ─(its wave starts)─▶ notified ─▶ downloading ─▶ verifying ─▶ installing ─▶ installed
       │                            ▲                                                    │
       │                            └── retry (backoff) ── failed / timed_out            ▼
       └─▶ quarantined (held out)                         refused, rolled_back      probation
                                                            (final failures)          │
                                                                      committed ◀─────┘

``installed`` and ``probation`` are still in progress: only ``committed`` (or
``already_installed``) counts as success, since the agent may roll back during probation. In a
shadow wave the devices settle in ``shadow`` (running the challenger beside the champion, which
keeps serving). Every write of a member's state is in ``server.rollout.members``.
"""

from __future__ import annotations

from enum import StrEnum

from contract import DeviceState


class ServerState(StrEnum):
    """Member states the server sets and a device never reports."""

    QUEUED = "queued"  # waits for its wave to start
    QUARANTINED = "quarantined"  # held out: too many failed attempts across rollouts
    TIMED_OUT = "timed_out"  # no progress within the wave's per-device timeout


MemberState = DeviceState | ServerState

SUCCESS_STATES = frozenset({DeviceState.COMMITTED, DeviceState.ALREADY_INSTALLED})
# Runs the challenger beside the champion: settled in a shadow wave.
SHADOW_STATE = DeviceState.SHADOW
RETRYABLE_STATES = frozenset({DeviceState.FAILED, ServerState.TIMED_OUT})
FAILURE_STATES = frozenset(
    {DeviceState.FAILED, DeviceState.REFUSED, DeviceState.ROLLED_BACK, ServerState.TIMED_OUT}
)
TERMINAL_STATES = SUCCESS_STATES | FAILURE_STATES
# Not (or no longer) sent the new release.
HELD_STATES = frozenset({ServerState.QUEUED, ServerState.QUARANTINED})
# Waiting for the device: the per-device timeout applies to these.
IN_PROGRESS_STATES = frozenset(
    {
        DeviceState.NOTIFIED,
        DeviceState.DOWNLOADING,
        DeviceState.VERIFYING,
        DeviceState.INSTALLING,
        DeviceState.INSTALLED,
        DeviceState.PROBATION,
    }
)

# States of a rollout (``rollouts.state``).
RUNNING_ROLLOUT_STATES = ("canary", "rolling", "full")
ACTIVE_ROLLOUT_STATES = ("pending_approval", *RUNNING_ROLLOUT_STATES, "awaiting_gate", "paused")
FINISHED_ROLLOUT_STATES = ("completed", "rolled_back", "aborted")


def state_for_wave(wave: int, last: int) -> str:
    """Rollout state while ``wave`` runs: canary (first), full (last), rolling (between)."""
    if wave >= last:
        return "full"
    return "canary" if wave == 0 else "rolling"
