"""Tables of the rollout engine.

- ``rollouts``: one row per rollout, its state, plan and targeting.
- ``rollout_devices``: each member device's wave and state (one writer: ``server.rollout.members``).

- ``rollout_waves``: one row per started wave. Its primary key (rollout, wave) makes starting a
  wave twice impossible, whatever number of engines or restarts race for it.
- ``rollout_events``: what the server did to a rollout or a device, with time and reason
  (queued, notified, timed out, retried, quarantined, paused, ...). What devices reported
  themselves is in ``device_events``.
- ``device_health``: failures per device across rollouts, and the quarantine they lead to.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.core.errors import NotFoundError
from server.db.base import Base, BigId, UTCDateTime, utcnow


class Rollout(Base):
    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_line_state", "model_line", "state"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    release: Mapped[int | None] = mapped_column(Integer)
    rollback_release: Mapped[int | None] = mapped_column(Integer)
    # pending_approval/canary/rolling/full/awaiting_gate/paused/completed/rolled_back/aborted
    state: Mapped[str] = mapped_column(String(24))
    paused_state: Mapped[str | None] = mapped_column(String(24))  # what resume returns to
    stage: Mapped[int] = mapped_column(Integer, default=0)
    canary_percent: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(128))
    approved_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stage_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    full_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text)
    gates: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Waves and the hash cut-offs frozen at approval (server.rollout.plan.Plan); stage = wave.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Who it is for (contract.Targeting.to_dict(), opset left to the model); None: any device.
    # Signed into the rollout's releases; devices outside it never become members.
    targeting: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), primary_key=True)
    stage: Mapped[int] = mapped_column(Integer)  # the device's wave (0 = canary)
    state: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    installed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # server clock
    reason: Mapped[str | None] = mapped_column(Text)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # first sent the release
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # re-sends after a failure
    failures: Mapped[int] = mapped_column(Integer, default=0)  # failed attempts counted


class RolloutWave(Base):
    __tablename__ = "rollout_waves"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_by: Mapped[str] = mapped_column(String(128))  # approver, or "engine"
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(24))  # succeeded/rolled_back/aborted
    reason: Mapped[str | None] = mapped_column(Text)
    # An operator resumed after this wave's error pause: the error condition no longer pauses.
    error_override: Mapped[bool] = mapped_column(Boolean, default=False)


class RolloutEvent(Base):
    __tablename__ = "rollout_events"
    __table_args__ = (Index("ix_rollout_events_rollout", "rollout_id", "device_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"))
    device_id: Mapped[str | None] = mapped_column(String(128))  # None: about the rollout
    wave: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    by: Mapped[str | None] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeviceHealth(Base):
    __tablename__ = "device_health"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # since the last quarantine
    quarantined_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def get_rollout(session: Session, *, rollout_id: int) -> Rollout:
    """The rollout, read afresh (``populate_existing``: a session that saw it before sees its
    current row).

    Raises:
        NotFoundError: unknown rollout.
    """
    rollout = session.get(Rollout, rollout_id, populate_existing=True)
    if rollout is None:
        raise NotFoundError(f"unknown rollout {rollout_id}")
    return rollout
