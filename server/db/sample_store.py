"""Uploaded field samples, their quarantine and the per-device upload counter; sample queries.

``sample_quarantine`` holds one row per sample screening kept out of dataset versions, with the
reason an operator reads; ``sample_upload_counts`` counts accepted uploads per device per UTC day,
so the daily quota holds across server processes sharing one database.

Label provenance: a sample captured with its ground truth (``feedback`` on the device) has
``origin`` ``device`` and ``label_source`` ``device``; one captured *without* a label under a
capture policy has ``origin`` ``device_capture`` and no label: it waits in the labelling queue
(``server.intake.labelling``), counts toward nothing and enters no dataset until a label fills it,
from the device (``label_source`` ``device``) or an operator's import (``operator``, with
``labelled_by``). :func:`provenance` names the pair as the dataset manifest counts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, Integer, LargeBinary, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db.base import Base, UTCDateTime, utcnow

ORIGIN_DEVICE = "device"  # captured with the device's ground truth
ORIGIN_CAPTURE = "device_capture"  # captured unlabelled under a capture policy
LABEL_DEVICE = "device"  # ground truth from the device
LABEL_OPERATOR = "operator"  # an operator's import (labelling queue)


def provenance(origin: str | None, label_source: str | None) -> str:
    """Where a sample's label came from, as dataset manifests count it: ``device`` (captured
    with its ground truth), ``device_capture+device`` or ``device_capture+operator``."""
    if (origin or ORIGIN_DEVICE) == ORIGIN_DEVICE:
        return label_source or LABEL_DEVICE
    return f"{origin}+{label_source or 'unlabelled'}"


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (
        Index("ix_samples_line", "model_line"),
        # The same input twice on a line is refused (content hash); this makes it race-proof.
        Index("uq_samples_line_content", "model_line", "content_sha256", unique=True),
        Index("ix_samples_device", "device_id"),
    )

    sample_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    model_line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"))
    model_version: Mapped[int] = mapped_column(Integer)
    input: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian
    true_label: Mapped[int | None] = mapped_column(Integer)  # None: waits for a label
    predicted_label: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
    captured_at: Mapped[float] = mapped_column(Float)  # unix seconds, device clock
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    content_sha256: Mapped[str | None] = mapped_column(String(64))  # of the input bytes
    origin: Mapped[str] = mapped_column(String(16), default=ORIGIN_DEVICE, server_default="device")
    label_source: Mapped[str | None] = mapped_column(String(16))  # LABEL_* ; None: unlabelled
    labelled_by: Mapped[str | None] = mapped_column(String(128))  # operator name (imports)
    labelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SampleQuarantine(Base):
    """A sample screening kept out of every dataset version, and why."""

    __tablename__ = "sample_quarantine"

    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.sample_id"), primary_key=True)
    model_line: Mapped[str] = mapped_column(String(64), index=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    check: Mapped[str] = mapped_column(String(32))  # label | device
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    released_by: Mapped[str | None] = mapped_column(String(128))


class SampleUploadCount(Base):
    """Accepted uploads of one device on one UTC day (the quota counter)."""

    __tablename__ = "sample_upload_counts"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, UTC
    count: Mapped[int] = mapped_column(Integer, default=0)


def quarantined_ids(*, line: str) -> Any:
    """A subquery of the line's quarantined (not released) sample ids."""
    return select(SampleQuarantine.sample_id).where(
        SampleQuarantine.model_line == line, SampleQuarantine.released_at.is_(None)
    )


def samples_of_line(session: Session, *, line: str) -> Sequence[Any]:
    """The line's samples a dataset version may include: quarantined and unlabelled ones are
    left out."""
    return session.execute(
        select(
            Sample.sample_id,
            Sample.device_id,
            Sample.input,
            Sample.true_label,
            Sample.origin,
            Sample.label_source,
        )
        .where(
            Sample.model_line == line,
            Sample.true_label.is_not(None),
            Sample.sample_id.not_in(quarantined_ids(line=line)),
        )
        .order_by(Sample.received_at, Sample.sample_id)
    ).all()
