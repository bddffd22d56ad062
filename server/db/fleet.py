"""Devices, their metrics reports and status history; the device queries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from contract.topics import valid_device_id
from server.core.errors import InvalidRequestError, NotFoundError
from server.db.base import Base, BigId, UTCDateTime, utcnow
from server.db.registry import get_model_line


class Device(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"), index=True)
    hardware: Mapped[str | None] = mapped_column(String(128))
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    state: Mapped[str | None] = mapped_column(String(32))
    model_version: Mapped[int | None] = mapped_column(Integer)
    release: Mapped[int | None] = mapped_column(Integer)
    last_reason: Mapped[str | None] = mapped_column(Text)


class DeviceMetric(Base):
    __tablename__ = "device_metrics"
    __table_args__ = (
        Index("ix_metrics_line_version", "model_line", "model_version"),
        # The monitoring evaluator reads a line's reports by window of received_at.
        Index("ix_metrics_line_received", "model_line", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    model_line: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    rollout_id: Mapped[int | None] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)  # device clock
    window_s: Mapped[float] = mapped_column(Float)
    inferences: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    labelled: Mapped[int] = mapped_column(BigInteger)
    correct: Mapped[int] = mapped_column(BigInteger)
    p50: Mapped[float] = mapped_column(Float)
    p95: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeviceEvent(Base):
    """Status history: every StatusReport accepted, for operators chasing a stuck device."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    ts: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[int | None] = mapped_column(Integer)
    release: Mapped[int | None] = mapped_column(Integer)
    rollout_id: Mapped[int | None] = mapped_column(BigInteger)
    target_release: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What the server left out of the report ("dropped rollout_id: out of range"); None: nothing.
    dropped: Mapped[list[str] | None] = mapped_column(JSON)


def register_device(
    session: Session,
    *,
    device_id: str,
    model_line: str,
    hardware: str | None,
    groups: list[str],
    agent_version: str | None,
    now: datetime,
    commit: bool = True,
) -> Device:
    """Idempotent upsert of a device; commits (or only flushes with ``commit=False``).

    Raises:
        InvalidRequestError: invalid device id.
        NotFoundError: unknown model line.
    """
    if not valid_device_id(device_id):
        raise InvalidRequestError(
            "device_id must be 1-128 of [A-Za-z0-9._:-] starting with a letter or digit"
        )
    get_model_line(session, name=model_line)
    device = session.get(Device, device_id)
    if device is None:
        device = Device(device_id=device_id, registered_at=now, groups=[])
        session.add(device)
    device.model_line = model_line
    device.hardware = hardware
    device.groups = list(groups)
    device.agent_version = agent_version
    device.last_seen = now
    if commit:
        session.commit()
    else:
        session.flush()
    return device


def get_device(session: Session, *, device_id: str) -> Device:
    device = session.get(Device, device_id) if valid_device_id(device_id) else None
    if device is None:
        raise NotFoundError(f"unknown device {device_id!r}")
    return device


def list_devices(session: Session, *, model_line: str | None = None) -> Sequence[Device]:
    stmt = select(Device).order_by(Device.device_id)
    if model_line is not None:
        stmt = stmt.where(Device.model_line == model_line)
    return session.scalars(stmt).all()


def device_ids_of_line(session: Session, *, model_line: str) -> list[str]:
    return list(
        session.scalars(select(Device.device_id).where(Device.model_line == model_line)).all()
    )
