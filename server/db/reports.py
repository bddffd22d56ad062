"""The table of device reports the server refused, and its queries (same ``Base``).

``refused_reports`` holds one row per report the ingest writer could not use at all (not JSON,
not an object, another device's id, no state, a count out of range, or a row the database
refused), filed under the device of the topic it came on, with the reason and a bounded excerpt.
The writer keeps the newest ``MAX_REFUSED_PER_DEVICE`` per device, so a device publishing garbage
in a loop cannot fill the disk. Reports stored with a field dropped are not here: their
``device_events`` row names what was dropped (``DeviceEvent.dropped``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Index, Integer, String, Text, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db.base import Base, BigId, UTCDateTime, utcnow
from server.db.fleet import DeviceEvent

MAX_REFUSED_PER_DEVICE = 100  # refused reports kept per device (the newest)
MAX_LISTED = 500  # rows one API call returns


class RefusedReport(Base):
    """A report from a registered device's topic that could not be stored as such."""

    __tablename__ = "refused_reports"
    __table_args__ = (Index("ix_refused_reports_device", "device_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128))  # the topic's
    kind: Mapped[str] = mapped_column(String(16))  # status/metrics
    reason: Mapped[str] = mapped_column(Text)  # at most ingest_parse.MAX_REFUSAL_CHARS
    excerpt: Mapped[str] = mapped_column(Text)  # at most ingest_parse.MAX_EXCERPT_CHARS
    size: Mapped[int | None] = mapped_column(Integer)  # bytes received; None: came parsed
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def record_refused(
    session: Session,
    *,
    device_id: str,
    kind: str,
    reason: str,
    excerpt: str = "",
    now: datetime,
) -> None:
    """Store one refusal the device itself reports (kind ``capture_policy``: a signed capture
    policy it refused) beside the server's; keeps the newest per device. Flushes."""
    session.add(
        RefusedReport(
            device_id=device_id,
            kind=kind,
            reason=reason.replace("\x00", ""),
            excerpt=excerpt.replace("\x00", ""),
            size=None,
            received_at=now,
        )
    )
    session.flush()
    prune_refused(session, [device_id])


def prune_refused(session: Session, device_ids: Iterable[str]) -> None:
    """Delete all but the newest ``MAX_REFUSED_PER_DEVICE`` refused reports of each device."""
    for device_id in sorted(set(device_ids)):
        cutoff = (
            select(RefusedReport.id)
            .where(RefusedReport.device_id == device_id)
            .order_by(RefusedReport.id.desc())
            .offset(MAX_REFUSED_PER_DEVICE - 1)
            .limit(1)
            .scalar_subquery()
        )
        session.execute(
            delete(RefusedReport).where(
                RefusedReport.device_id == device_id, RefusedReport.id < cutoff
            )
        )


def list_refused(session: Session, *, device_id: str, limit: int) -> Sequence[RefusedReport]:
    """The device's refused reports, newest first."""
    return session.scalars(
        select(RefusedReport)
        .where(RefusedReport.device_id == device_id)
        .order_by(RefusedReport.id.desc())
        .limit(min(limit, MAX_LISTED))
    ).all()


def list_events(session: Session, *, device_id: str, limit: int) -> Sequence[DeviceEvent]:
    """The device's stored status reports, newest first (as received)."""
    return session.scalars(
        select(DeviceEvent)
        .where(DeviceEvent.device_id == device_id)
        .order_by(DeviceEvent.id.desc())
        .limit(min(limit, MAX_LISTED))
    ).all()
