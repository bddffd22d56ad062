"""ORM tables of the poisoning guard and the audit log.

``audit_log`` is append-only: a trigger refuses UPDATE and DELETE on both backends (a database
superuser can still drop the trigger; that is what ``edgeloop audit verify`` is for).
``sample_quarantine`` holds one row per sample screening kept out of dataset versions, with the
reason an operator reads; ``sample_upload_counts`` counts accepted uploads per device per UTC day,
so the daily quota holds across server processes sharing one database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DDL, JSON, BigInteger, ForeignKey, Integer, String, Text, event
from sqlalchemy.orm import Mapped, mapped_column

from server.db.engine import Base, UTCDateTime, utcnow


class AuditRecord(Base):
    """One hash-chained audit record; ``hash`` covers every other column and ``prev_hash``."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the previous record
    hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of this record


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


_PG_APPEND_ONLY = DDL(
    """
    CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$
    BEGIN
        RAISE EXCEPTION USING MESSAGE = 'audit_log is append-only: ' || TG_OP || ' refused';
    END
    $$ LANGUAGE plpgsql;
    CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
    """
).execute_if(dialect="postgresql")

_SQLITE_NO_UPDATE = DDL(
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END"
).execute_if(dialect="sqlite")

_SQLITE_NO_DELETE = DDL(
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END"
).execute_if(dialect="sqlite")

for _ddl in (_PG_APPEND_ONLY, _SQLITE_NO_UPDATE, _SQLITE_NO_DELETE):
    event.listen(AuditRecord.__table__, "after_create", _ddl)
