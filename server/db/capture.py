"""The capture policies the server issued: one row per signed policy (the audit of what each
device group was told to capture, and the ``seq`` devices check against replay).

Written only by :class:`server.monitoring.capture.CapturePublisher`. The row id is the policy's
``seq`` (one counter for every line and group, so it only grows); the newest row of a (line,
group) is the policy in force, retained on the broker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.db.base import Base, BigId, UTCDateTime


class CapturePolicyRow(Base):
    __tablename__ = "capture_policies"
    __table_args__ = (Index("ix_capture_policies_line_group", "model_line", "group_name", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)  # = seq
    model_line: Mapped[str] = mapped_column(String(64))
    group_name: Mapped[str] = mapped_column(String(128))  # a device group, or "*"
    raised: Mapped[bool] = mapped_column(Boolean)  # False: the default (alert cleared)
    alert_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text, default="")
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)  # CapturePolicy.to_dict()
    envelope: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the signed message
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
