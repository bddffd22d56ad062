"""Dataset versions and which samples each holds (the lineage tables; see training.dataset)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.db.base import Base, UTCDateTime, utcnow


class DatasetVersion(Base):
    """An immutable, content-addressed dataset manifest (see training.dataset)."""

    __tablename__ = "dataset_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    base: Mapped[str] = mapped_column(Text)
    base_sha256: Mapped[str] = mapped_column(String(64))
    field_fraction: Mapped[float] = mapped_column(Float)
    sample_count: Mapped[int] = mapped_column(Integer)
    train_count: Mapped[int] = mapped_column(Integer)
    field_count: Mapped[int] = mapped_column(Integer)
    rejected_count: Mapped[int] = mapped_column(Integer)
    # The manifest without its id lists (those are the dataset_samples rows).
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_line: Mapped[str] = mapped_column(String(64))  # the line that first built it
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DatasetSample(Base):
    """Which accepted samples a dataset version holds, and on which side of the split."""

    __tablename__ = "dataset_samples"
    __table_args__ = (Index("ix_dataset_samples_sample", "sample_id"),)

    dataset_version: Mapped[str] = mapped_column(
        ForeignKey("dataset_versions.version"), primary_key=True
    )
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.sample_id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(8))  # train/field
