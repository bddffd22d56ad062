"""Hash-chained, append-only audit log: who did what to which thing, and when.

Every security-relevant change (signing, key rotation, enrollment, token creation, rollout
creation, approval, each rollout state change, rollback, sample quarantine) calls
:func:`record` inside the caller's transaction, so the record commits or rolls back with the
change it describes. Each record's ``hash`` is sha256 over the canonical JSON of
``[seq, ts, actor, action, subject, details, prev_hash]``; ``prev_hash`` is the previous record's
hash (64 zeros for the first). :func:`verify_chain` is pure: it recomputes every hash, so an
edited record shows as a hash mismatch and a deleted one as a gap in ``seq`` or a broken link.
A truncated tail leaves a valid shorter chain; it is caught only against a head hash kept
elsewhere (``expect_head``: write down the head from ``edgeloop audit verify`` periodically).
The database itself refuses UPDATE and DELETE on ``audit_log``: triggers made by the baseline
migration (``server/db/migrations/versions/0001_baseline.py``).

Appends serialise: on PostgreSQL a transaction-scoped advisory lock, held to the caller's
commit; SQLite transactions here start with ``BEGIN IMMEDIATE`` and so already hold the single
writer lock. Lock order: callers that lock rows and then audit take :func:`lock` first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, String, func, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db.base import Base, UTCDateTime


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


GENESIS_HASH = "0" * 64
# Arbitrary constant naming the audit log's advisory lock on PostgreSQL.
_PG_LOCK_KEY = 0x0A0D17
MAX_PAGE = 1000  # records per list call


@dataclass(frozen=True)
class AuditEntry:
    """One audit record as plain data (what verification reads)."""

    seq: int
    ts: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def public(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "details": self.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_chain`; ``first_bad_seq`` is None when ``ok``."""

    ok: bool
    count: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "count": self.count,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
        }


def _ts_text(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_details(details: dict[str, Any] | None) -> dict[str, Any]:
    """Details as they will read back from a JSON column (so the stored form is what is hashed)."""
    return json.loads(json.dumps(details or {}, default=str, sort_keys=True))


def record_hash(
    *,
    seq: int,
    ts: datetime,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any],
    prev_hash: str,
) -> str:
    """sha256 hex over the canonical JSON of one record's fields and its predecessor's hash."""
    body = [seq, _ts_text(ts), actor, action, subject, details, prev_hash]
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def lock(session: Session) -> None:
    """Take the audit log's append lock for the rest of the caller's transaction.

    :func:`record` takes it itself; a caller that will audit after locking rows others lock
    before auditing calls this first, so every transaction takes the audit lock before any row
    lock and two of them cannot deadlock. No-op on SQLite (one writer at a time anyway).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any] | None = None,
    now: datetime,
) -> None:
    """Append one hash-chained record in the caller's transaction (flushes, never commits).

    Args:
        actor: who acted: an operator name, ``device:<id>``, or ``engine``/``system``.
        action: dotted verb, e.g. ``rollout.state``, ``release.sign``.
        subject: what it acted on, e.g. ``rollout:7``, ``digits@3``.
        details: JSON-able extras (stored in canonical form; non-JSON values become strings).
        now: the time of the change (injected clock).
    """
    lock(session)
    head = session.execute(
        select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)
    ).first()
    seq = (head.seq + 1) if head else 1
    prev = head.hash if head else GENESIS_HASH
    ts = now if now.tzinfo else now.replace(tzinfo=UTC)
    ts = ts.astimezone(UTC)
    clean = canonical_details(details)
    digest = record_hash(
        seq=seq, ts=ts, actor=actor, action=action, subject=subject, details=clean, prev_hash=prev
    )
    session.add(
        AuditRecord(
            seq=seq,
            ts=ts,
            actor=actor,
            action=action,
            subject=subject,
            details=clean,
            prev_hash=prev,
            hash=digest,
        )
    )
    session.flush()


def _entry(row: AuditRecord) -> AuditEntry:
    return AuditEntry(
        seq=row.seq,
        ts=row.ts,
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        details=row.details if isinstance(row.details, dict) else {"_": row.details},
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def verify_chain(entries: Iterable[AuditEntry], *, expect_head: str | None = None) -> VerifyResult:
    """Check ``entries`` (in seq order) form one unbroken chain from seq 1.

    Returns the first problem found: a seq gap (deleted records), a ``prev_hash`` that does not
    name the previous record (deleted or reordered), or a hash mismatch (edited record). With
    ``expect_head``, a chain that never reaches that head hash is reported as truncated.
    """
    count = 0
    prev_seq = 0
    prev_hash = GENESIS_HASH
    seen_expected = expect_head is None
    for e in entries:
        count += 1
        if e.seq != prev_seq + 1:
            return VerifyResult(
                False,
                count,
                prev_seq,
                prev_hash,
                e.seq,
                f"seq {e.seq} follows seq {prev_seq}: records {prev_seq + 1}..{e.seq - 1} missing",
            )
        if e.prev_hash != prev_hash:
            return VerifyResult(
                False,
                count,
                prev_seq,
                prev_hash,
                e.seq,
                f"seq {e.seq}: prev_hash does not match the hash of seq {prev_seq}",
            )
        expected = record_hash(
            seq=e.seq,
            ts=e.ts,
            actor=e.actor,
            action=e.action,
            subject=e.subject,
            details=e.details,
            prev_hash=e.prev_hash,
        )
        if expected != e.hash:
            return VerifyResult(
                False,
                count,
                prev_seq,
                prev_hash,
                e.seq,
                f"seq {e.seq}: content does not match its hash (record edited)",
            )
        prev_seq, prev_hash = e.seq, e.hash
        if expect_head is not None and e.hash == expect_head:
            seen_expected = True
    if not seen_expected:
        return VerifyResult(
            False,
            count,
            prev_seq,
            prev_hash,
            prev_seq + 1,
            f"expected head {expect_head} not found: log truncated after seq {prev_seq} or forked",
        )
    return VerifyResult(True, count, prev_seq, prev_hash)


def iter_entries(session: Session, *, batch: int = 500) -> Iterator[AuditEntry]:
    """Every record in seq order, read in batches (the log can be long)."""
    after = 0
    while True:
        rows = session.scalars(
            select(AuditRecord)
            .where(AuditRecord.seq > after)
            .order_by(AuditRecord.seq)
            .limit(batch)
        ).all()
        if not rows:
            return
        for row in rows:
            yield _entry(row)
        after = rows[-1].seq


def verify(session: Session, *, expect_head: str | None = None) -> VerifyResult:
    """Verify the whole stored chain."""
    return verify_chain(iter_entries(session), expect_head=expect_head)


def list_entries(
    session: Session,
    *,
    after_seq: int = 0,
    limit: int = 100,
    action: str | None = None,
    subject: str | None = None,
) -> list[AuditEntry]:
    """A page of records with ``seq > after_seq``, oldest first (filter by action/subject)."""
    stmt = select(AuditRecord).where(AuditRecord.seq > after_seq)
    if action:
        stmt = stmt.where(AuditRecord.action == action)
    if subject:
        stmt = stmt.where(AuditRecord.subject == subject)
    rows = session.scalars(stmt.order_by(AuditRecord.seq).limit(max(1, min(limit, MAX_PAGE))))
    return [_entry(r) for r in rows]


def count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(AuditRecord)) or 0)
