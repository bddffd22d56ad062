"""Tables of the rollout engine beyond ``rollouts`` and ``rollout_devices`` (same ``Base``).

- ``rollout_waves``: one row per started wave. Its primary key (rollout, wave) makes starting a
  wave twice impossible, whatever number of engines or restarts race for it.
- ``rollout_events``: what the server did to a rollout or a device, with time and reason
  (queued, notified, timed out, retried, quarantined, paused, ...). What devices reported
  themselves is in ``device_events``.
- ``device_health``: failures per device across rollouts, and the quarantine they lead to.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.db.engine import Base, BigId, UTCDateTime, utcnow


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
