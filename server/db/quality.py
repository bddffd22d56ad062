"""Tables of the quality gates beyond ``device_metrics`` (same ``Base``).

- ``class_metrics``: per-class labelled counts of one metrics report, one row per class
  (support and correct of the true class, and how many labelled inputs were predicted as it).
  ``source`` says whose predictions were counted: ``served`` (the report's own model version),
  ``shadow`` (a challenger run in shadow; ``model_version`` is the challenger) or
  ``shadow_champion`` (the serving champion on the very inputs the challenger was compared on).
  Rows are inserted in the ingest writer's batch, summed per class in SQL by the gates.
- ``shadow_metrics``: a shadow report's agreement and paired accuracy figures, one row per
  metrics report that carried them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from server.db.base import Base, BigId, UTCDateTime, utcnow

CLASS_SOURCES = ("served", "shadow", "shadow_champion")


class ClassMetric(Base):
    __tablename__ = "class_metrics"
    __table_args__ = (
        Index("ix_class_metrics_line_version", "model_line", "model_version", "source"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    model_line: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # one of CLASS_SOURCES
    label: Mapped[int] = mapped_column(Integer)  # true class index
    support: Mapped[int] = mapped_column(BigInteger)
    correct: Mapped[int] = mapped_column(BigInteger)
    predicted: Mapped[int] = mapped_column(BigInteger, default=0)  # inputs put in this class
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ShadowMetric(Base):
    __tablename__ = "shadow_metrics"
    __table_args__ = (Index("ix_shadow_metrics_line_version", "model_line", "challenger_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    model_line: Mapped[str] = mapped_column(String(64))
    champion_version: Mapped[int] = mapped_column(Integer)  # the serving model
    challenger_version: Mapped[int] = mapped_column(Integer)
    compared: Mapped[int] = mapped_column(BigInteger)
    agreed: Mapped[int] = mapped_column(BigInteger)
    labelled: Mapped[int] = mapped_column(BigInteger)
    champion_correct: Mapped[int] = mapped_column(BigInteger)
    challenger_correct: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
