"""What operators read about rollouts: one rollout per wave, its members, a member's history,
the events; the API's rollout routes return these.

Reads only: every change goes through the engine (``server.rollout.engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.core.errors import NotFoundError
from server.db.fleet import DeviceEvent
from server.db.rollouts import Rollout, RolloutDevice, RolloutEvent, RolloutWave, get_rollout
from server.rollout.decide import wave_counts
from server.rollout.queries import plan_of


def list_rollouts(session: Session, *, model_line: str | None = None) -> Sequence[Rollout]:
    """Rollouts, newest first (of one line, or all)."""
    stmt = select(Rollout).order_by(Rollout.id.desc())
    if model_line is not None:
        stmt = stmt.where(Rollout.model_line == model_line)
    return session.scalars(stmt).all()


def _wave_state(rollout: Rollout, wave: int, row: RolloutWave | None) -> str:
    if row is None:
        if rollout.state == "awaiting_gate" and wave == rollout.stage + 1:
            return "awaiting_approval"
        return "pending"
    if row.finished_at is not None:
        return row.outcome or "done"
    return "paused" if rollout.state == "paused" else "running"


def rollout_detail(
    session: Session, rollout_id: int, settings: Settings
) -> tuple[Rollout, dict[str, Any]]:
    """The rollout and what it adds to its public form: member counts (canary and the rest) and
    each wave of its plan with its spec, state, member counts and start.

    Raises:
        NotFoundError: unknown rollout.
    """
    rollout = get_rollout(session, rollout_id=rollout_id)
    rows = session.execute(
        select(RolloutDevice.stage, RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.stage, RolloutDevice.state)
    ).all()
    per_wave = wave_counts([(w, s) for w, s, n in rows for _ in range(int(n))])
    counts: dict[str, dict[str, int]] = {"canary": {}, "rest": {}}
    for wave, states in per_wave.items():
        key = "canary" if wave == 0 else "rest"
        for state, n in states.items():
            counts[key][state] = counts[key].get(state, 0) + n
    plan = plan_of(rollout, settings)
    started = {
        w.wave: w
        for w in session.scalars(
            select(RolloutWave).where(RolloutWave.rollout_id == rollout_id)
        ).all()
    }
    waves = []
    for i, spec in enumerate(plan.waves):
        row = started.get(i)
        waves.append(
            {
                "index": i,
                "label": spec.label,
                "spec": spec.to_dict(),
                "state": _wave_state(rollout, i, row),
                "devices": per_wave.get(i, {}),
                "started_at": row.started_at if row else None,
                "started_by": row.started_by if row else None,
                "finished_at": row.finished_at if row else None,
                "reason": row.reason if row else None,
            }
        )
    return rollout, {"devices": counts, "waves": waves}


def _member_row(r: RolloutDevice) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "wave": r.stage + 1,
        "state": r.state,
        "reason": r.reason,
        "updated_at": r.updated_at,
        "notified_at": r.notified_at,
        "installed_at": r.installed_at,
        "attempts": r.attempts,
        "failures": r.failures,
    }


def list_members(
    session: Session, rollout_id: int, *, wave: int | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    """Every member: wave (1-based), state, reason, timestamps, attempts; by wave and device.

    Raises:
        NotFoundError: unknown rollout.
    """
    get_rollout(session, rollout_id=rollout_id)
    rd = RolloutDevice
    stmt = select(rd).where(rd.rollout_id == rollout_id).order_by(rd.stage, rd.device_id)
    if wave is not None:
        stmt = stmt.where(rd.stage == wave - 1)
    if state is not None:
        stmt = stmt.where(rd.state == state)
    return [_member_row(r) for r in session.scalars(stmt).all()]


def member_history(session: Session, rollout_id: int, device_id: str) -> dict[str, Any]:
    """One member: its row and its history (the server's transitions and the device's reports
    about this rollout), oldest first.

    Raises:
        NotFoundError: unknown rollout, or the device is not a member.
    """
    if not 1 <= len(device_id) <= 128:
        raise NotFoundError(f"device {device_id[:128]!r} is not in rollout {rollout_id}")
    rollout = get_rollout(session, rollout_id=rollout_id)
    row = session.get(RolloutDevice, (rollout_id, device_id))
    if row is None:
        raise NotFoundError(f"device {device_id!r} is not in rollout {rollout_id}")
    history: list[dict[str, Any]] = [
        {"at": e.at, "source": "server", "state": e.state, "reason": e.reason, "by": e.by}
        for e in session.scalars(
            select(RolloutEvent).where(
                RolloutEvent.rollout_id == rollout_id, RolloutEvent.device_id == device_id
            )
        ).all()
    ]
    releases = [r for r in (rollout.release,) if r is not None]
    history += [
        {
            "at": e.received_at,
            "source": "device",
            "state": e.state,
            "reason": e.reason,
            "model_version": e.model_version,
            "target_release": e.target_release,
        }
        for e in session.scalars(
            select(DeviceEvent).where(
                DeviceEvent.device_id == device_id,
                or_(
                    DeviceEvent.rollout_id == rollout_id,
                    DeviceEvent.target_release.in_(releases or [-1]),
                ),
            )
        ).all()
    ]
    history.sort(key=lambda h: h["at"])
    return {**_member_row(row), "history": history}


def rollout_events(session: Session, rollout_id: int) -> list[dict[str, Any]]:
    """What the server did to the rollout and its members, oldest first.

    Raises:
        NotFoundError: unknown rollout.
    """
    get_rollout(session, rollout_id=rollout_id)
    return [
        {
            "at": e.at,
            "device_id": e.device_id,
            "wave": None if e.wave is None else e.wave + 1,
            "state": e.state,
            "reason": e.reason,
            "by": e.by,
        }
        for e in session.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == rollout_id)
            .order_by(RolloutEvent.id)
        ).all()
    ]
