"""The ingest writer: drains device reports from a queue and writes them in batches.

Reports are status, metrics and monitor summaries (``contract.monitoring.MonitorSummary``, one
row each in ``monitor_summaries``). A summary is also held to its model's reference by the
``check_summary`` the composition root gives (``server.monitoring.references``): a summary for a
version the line does not have, or whose signals or bins the reference does not have, is
refused with that reason, like any other report the server cannot use.

Sources are the MQTT bridge (raw payload bytes) and the HTTP fallback endpoints (already read
reports). Each message is read by ``server.fleet.ingest_parse.classify``, which never raises: a
status report with a field out of range is stored with that field dropped (``DeviceEvent.dropped``
says which), and a report the server cannot use at all is stored as refused (``refused_reports``,
under the topic's device, with the reason and an excerpt) so the operator sees it. Reports of
unregistered devices are counted and dropped.

One batch (up to ``batch_max`` messages or ``batch_wait_s``) is one transaction: bulk inserts of
metrics, status events and refusals, one UPDATE per device, one per rollout device. If a batch
fails to write, it is split in halves and each half written on its own, down to the single report
the database refuses, which is then stored as refused: one poison message cannot drop the others,
and nothing a device sends can end the writer's thread.

Several server processes write the same devices' rows (a shared subscription hands a device's
reports to any of them). Each batch updates its rows in device order, so two batches lock them in
the same order; a batch the database still aborts as a deadlock or a serialization failure is
written again (``CONFLICT_RETRIES``, with a short random pause): such an abort is no outage, and
no report of the batch is lost to it.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from contract import MetricsReport, StatusReport
from contract.monitoring import MonitorSummary
from server.core.background import Worker
from server.core.errors import UnavailableError
from server.db.base import utcnow
from server.db.fleet import Device, DeviceEvent, DeviceMetric
from server.db.monitoring import MonitorSummaryRow
from server.db.quality import ClassMetric, ShadowMetric
from server.db.reports import RefusedReport, prune_refused
from server.fleet.ingest_parse import (
    MAX_REFUSAL_CHARS,
    Accepted,
    Refusal,
    classify,
    excerpt,
    printable,
)
from server.fleet.mqtt_bridge import IngestItem
from server.rollout.members import apply_reports

log = logging.getLogger(__name__)

Report = StatusReport | MetricsReport | MonitorSummary
CONFLICT_RETRIES = 5  # times a batch aborted by a deadlock or serialization failure is retried
# SQLSTATEs of a transaction the database aborted to break a conflict: retrying succeeds.
_CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
# Why a summary does not fit its model (None: it fits); runs in the writer's transaction.
SummaryCheck = Callable[[Session, MonitorSummary], str | None]
Entry = tuple[Accepted | Refusal, datetime]  # a classified message and when it was received


@dataclass
class IngestStats:
    received: int = 0
    status_written: int = 0
    metrics_written: int = 0
    monitor_written: int = 0  # monitor summaries stored
    invalid: int = 0  # reports refused (stored in refused_reports when the device is known)
    refused_stored: int = 0
    fields_dropped: int = 0  # reports stored with at least one field dropped
    unknown_device: int = 0
    batches: int = 0
    failed_writes: int = 0  # reports lost: neither they nor their refusal could be stored
    batch_fallbacks: int = 0  # batches (or halves) that failed whole and were split
    conflict_retries: int = 0  # batches written again after a deadlock or serialization abort
    last_error: str | None = None


@dataclass
class _Written:
    """What one committed transaction stored (added to the stats only after the commit)."""

    status: int = 0
    metrics: int = 0
    monitor: int = 0
    refused: int = 0
    invalid: int = 0  # refused inside the transaction (another model line)
    dropped: int = 0
    unknown: int = 0


class IngestWriter:
    """Batches reports from ``queue`` into transactions; ``drain_once`` is callable from tests."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        ingest_queue: queue.Queue[IngestItem],
        batch_max: int = 500,
        batch_wait_s: float = 0.2,
        clock: Callable[[], datetime] = utcnow,
        check_summary: SummaryCheck | None = None,  # None: summaries are not held to a model
    ) -> None:
        self.sessions = sessions
        self.check_summary = check_summary
        self.queue = ingest_queue
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self.stats = IngestStats()
        self._worker = Worker(
            "ingest-writer", self._step, error_wait_s=0.0, on_error=self._record_error
        )

    def submit(self, kind: str, report: Report | Accepted) -> None:
        """Queue a report received over HTTP. Raises UnavailableError when the queue is full."""
        try:
            self.queue.put((kind, report.device_id, report, self.clock()), timeout=1.0)
        except queue.Full as exc:
            raise UnavailableError("ingest queue is full; retry later") from exc

    def _collect(self, timeout: float) -> list[IngestItem]:
        try:
            batch = [self.queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self.queue.get(timeout=max(remaining, 0))
                    if remaining > 0
                    else self.queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def drain_once(self, timeout: float = 0.5) -> int:
        """Write one batch; returns the number of messages taken from the queue."""
        batch = self._collect(timeout)
        if batch:
            self.write_batch(batch)
        return len(batch)

    def drain(self) -> int:
        """Write until the queue is empty (tests and shutdown)."""
        total = 0
        while n := self.drain_once(timeout=0):
            total += n
        return total

    def write_batch(self, batch: list[IngestItem]) -> None:
        """Classify and store one batch; never raises for anything a device sent."""
        self.stats.received += len(batch)
        entries: list[Entry] = []
        for kind, device_id, payload, received_at in batch:
            entry = classify(kind, device_id, payload, received_ts=received_at.timestamp())
            if isinstance(entry, Refusal):
                self.stats.invalid += 1
                log.info("refused %s message for %s: %s", kind, device_id, entry.reason)
            entries.append((entry, received_at))
        self._write_or_split(entries)

    def _write_or_split(self, entries: list[Entry]) -> None:
        """Write ``entries`` in one transaction; on failure, each half on its own, down to the
        single report the database refuses (stored as refused instead)."""
        if not entries:
            return
        try:
            written = self._write_retrying(entries)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's, or a driver's own (encoding)
            if _is_outage(exc):
                # No report is to blame: splitting would only repeat the failure (or the
                # busy timeout) per half. Lost, as the broker has already had its ack.
                self.stats.failed_writes += len(entries)
                self.stats.last_error = str(exc)[:500]
                log.error("database unavailable, %d reports lost: %s", len(entries), exc)
                return
            if len(entries) == 1:
                self._store_unwritable(entries[0], exc)
                return
            self.stats.batch_fallbacks += 1
            log.warning("batch of %d failed (%s); writing it in halves", len(entries), exc)
            mid = len(entries) // 2
            self._write_or_split(entries[:mid])
            self._write_or_split(entries[mid:])
            return
        self.stats.status_written += written.status
        self.stats.metrics_written += written.metrics
        self.stats.monitor_written += written.monitor
        self.stats.refused_stored += written.refused
        self.stats.invalid += written.invalid
        self.stats.fields_dropped += written.dropped
        self.stats.unknown_device += written.unknown
        self.stats.batches += 1

    def _store_unwritable(self, entry: Entry, exc: Exception) -> None:
        """One report the database would not take: store its refusal, or count it lost."""
        item, received_at = entry
        if isinstance(item, Accepted):
            why = f"the database refused the report ({type(exc).__name__}: {exc})"
            item = Refusal(
                kind=item.kind,
                device_id=item.device_id,
                reason=printable(why, MAX_REFUSAL_CHARS)[0],
                excerpt=excerpt(item),
                size=None,
            )
            self.stats.invalid += 1
            try:
                written = self._write([(item, received_at)])
            except Exception as again:  # noqa: BLE001 - counted and logged below
                exc = again
            else:
                self.stats.refused_stored += written.refused
                self.stats.unknown_device += written.unknown
                log.error("stored report from %s as refused: %s", item.device_id, item.reason)
                return
        self.stats.failed_writes += 1
        self.stats.last_error = str(exc)[:500]
        log.error("could not store report from %s: %s", item.device_id, exc)

    def _write_retrying(self, entries: list[Entry]) -> _Written:
        """``_write``, again when the database aborted it to break a conflict with another
        writer (a deadlock, a serialization failure); other errors are raised at once."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                return self._write(entries)
            except DBAPIError as exc:
                if not _is_conflict(exc) or attempt == CONFLICT_RETRIES:
                    raise
                self.stats.conflict_retries += 1
                log.info("batch of %d aborted by a conflict, written again: %s", len(entries), exc)
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _write(self, entries: list[Entry]) -> _Written:
        written = _Written()
        with self.sessions() as session:
            ids = {e.device_id for e, _ in entries}
            lines = dict(
                session.execute(
                    select(Device.device_id, Device.model_line).where(Device.device_id.in_(ids))
                )
                .tuples()
                .all()
            )
            metrics: list[dict[str, Any]] = []
            classes: list[dict[str, Any]] = []
            shadows: list[dict[str, Any]] = []
            summaries: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []
            refused: list[dict[str, Any]] = []
            statuses: list[tuple[StatusReport, datetime]] = []
            seen: dict[str, datetime] = {}
            last_status: dict[str, tuple[StatusReport, datetime]] = {}
            for entry, received_at in entries:
                line = lines.get(entry.device_id)
                if line is None:  # nowhere to file a refusal: counted (unknown_device), logged
                    written.unknown += 1
                    log.info("refused %s report: unknown device %r", entry.kind, entry.device_id)
                    continue
                if isinstance(entry, Refusal):
                    refused.append(_refused_row(entry, received_at))
                    continue
                report = entry.report
                if report.model_line and report.model_line != line:
                    why = f"model_line {report.model_line!r} is not the device's line {line!r}"
                    refused.append(
                        _refused_row(
                            Refusal(entry.kind, entry.device_id, why, excerpt(entry), None),
                            received_at,
                        )
                    )
                    written.invalid += 1
                    continue
                if isinstance(report, MonitorSummary) and self.check_summary is not None:
                    why_not = self.check_summary(session, report)
                    if why_not is not None:
                        refused.append(
                            _refused_row(
                                Refusal(entry.kind, entry.device_id, why_not, excerpt(entry), None),
                                received_at,
                            )
                        )
                        written.invalid += 1
                        continue
                written.dropped += bool(entry.dropped)
                seen[report.device_id] = max(received_at, seen.get(report.device_id, received_at))
                if isinstance(report, MonitorSummary):
                    summaries.append(_summary_row(report, received_at))
                elif isinstance(report, MetricsReport):
                    metrics.append(_metric_row(report, received_at))
                    classes.extend(_class_rows(report, received_at))
                    if report.shadow is not None:
                        shadows.append(_shadow_row(report, received_at))
                else:
                    events.append(_event_row(report, entry.dropped, received_at))
                    statuses.append((report, received_at))
                    prev = last_status.get(report.device_id)
                    if prev is None or report.ts >= prev[0].ts:
                        last_status[report.device_id] = (report, received_at)
            if metrics:
                session.execute(insert(DeviceMetric), metrics)
            if classes:
                session.execute(insert(ClassMetric), classes)
            if shadows:
                session.execute(insert(ShadowMetric), shadows)
            if summaries:
                session.execute(insert(MonitorSummaryRow), summaries)
            if events:
                session.execute(insert(DeviceEvent), events)
            if refused:
                session.execute(insert(RefusedReport), refused)
                prune_refused(session, (r["device_id"] for r in refused))
            self._update_devices(session, seen, last_status)
            apply_reports(session, statuses, lines)
            session.commit()
        written.metrics, written.status, written.refused = len(metrics), len(events), len(refused)
        written.monitor = len(summaries)
        return written

    @staticmethod
    def _update_devices(
        session: Session,
        seen: dict[str, datetime],
        last_status: dict[str, tuple[StatusReport, datetime]],
    ) -> None:
        dev = cast(Table, Device.__table__)
        # In device order, like every batch of every server: no two batches deadlock here.
        seen_only = [
            {"d_id": d, "seen": t} for d, t in sorted(seen.items()) if d not in last_status
        ]
        if seen_only:
            session.execute(
                update(dev)
                .where(dev.c.device_id == bindparam("d_id"))
                .values(last_seen=bindparam("seen")),
                seen_only,
            )
        rows = [
            {
                "d_id": d,
                "seen": seen[d],
                "st": r.state.value,
                "mv": r.model_version,
                "rel": r.release,
                "why": _clean(r.reason),
            }
            for d, (r, _) in sorted(last_status.items())
        ]
        if rows:
            session.execute(
                update(dev)
                .where(dev.c.device_id == bindparam("d_id"))
                .values(
                    last_seen=bindparam("seen"),
                    state=bindparam("st"),
                    model_version=bindparam("mv"),
                    release=bindparam("rel"),
                    last_reason=bindparam("why"),
                ),
                rows,
            )

    # ------------------------------------------------------------ thread

    @property
    def running(self) -> bool:
        """Whether the writer's thread is alive (it survives any report; see Worker)."""
        return self._worker.running

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()
        try:
            self.drain()
        except Exception:  # shutting down: log, do not mask the original shutdown path
            log.exception("final ingest drain failed")

    def _step(self) -> float:
        self.drain_once(timeout=0.5)  # blocks up to 0.5 s for the first message: no extra wait
        return 0.0

    def _record_error(self, exc: Exception) -> None:
        self.stats.failed_writes += 1
        self.stats.last_error = str(exc)[:500]


def _is_conflict(exc: DBAPIError) -> bool:
    """The database aborted the transaction to break a conflict (PostgreSQL SQLSTATE 40P01 or
    40001): the same write, tried again, succeeds."""
    return getattr(exc.orig, "sqlstate", None) in _CONFLICT_SQLSTATES


def _is_outage(exc: Exception) -> bool:
    """The database, not a report, failed: connection lost, pool exhausted, locked, shut down."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError)


def _clean(text: str | None) -> str | None:
    return text.replace("\x00", "") if text is not None else None


def _metric_row(r: MetricsReport, received_at: datetime) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "model_line": r.model_line,
        "model_version": r.model_version,
        "rollout_id": r.rollout_id,
        "ts": r.ts,
        "window_s": r.window_s,
        "inferences": r.inferences,
        "errors": r.errors,
        "labelled": r.labelled,
        "correct": r.correct,
        "p50": r.latency_ms_p50,
        "p95": r.latency_ms_p95,
        "received_at": received_at,
    }


def _class_rows(r: MetricsReport, received_at: datetime) -> list[dict[str, Any]]:
    """Per-class rows of one report: served counts, and a shadow's two sides if any."""
    sides = [("served", r.model_version, r.class_counts)]
    if r.shadow is not None:
        sides.append(("shadow", r.shadow.model_version, r.shadow.class_counts))
        sides.append(("shadow_champion", r.shadow.model_version, r.shadow.champion_class_counts))
    return [
        {
            "device_id": r.device_id,
            "model_line": r.model_line,
            "model_version": version,
            "source": source,
            "label": c.label,
            "support": c.support,
            "correct": c.correct,
            "predicted": c.predicted,
            "received_at": received_at,
        }
        for source, version, counts in sides
        for c in counts
        if c.support or c.predicted
    ]


def _shadow_row(r: MetricsReport, received_at: datetime) -> dict[str, Any]:
    s = r.shadow
    assert s is not None
    return {
        "device_id": r.device_id,
        "model_line": r.model_line,
        "champion_version": r.model_version,
        "challenger_version": s.model_version,
        "compared": s.compared,
        "agreed": s.agreed,
        "labelled": s.labelled,
        "champion_correct": s.champion_correct,
        "challenger_correct": s.challenger_correct,
        "errors": s.errors,
        "received_at": received_at,
    }


def _summary_row(r: MonitorSummary, received_at: datetime) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "model_line": r.model_line,
        "model_version": r.model_version,
        "release": r.release,
        "period_start": r.start,
        "period_end": r.end,
        "samples": r.samples,
        "counts": {name: list(c) for name, c in r.counts},
        "received_at": received_at,
    }


def _refused_row(r: Refusal, received_at: datetime) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "kind": r.kind,
        "reason": r.reason,
        "excerpt": r.excerpt,
        "size": r.size,
        "received_at": received_at,
    }


def _event_row(r: StatusReport, dropped: tuple[str, ...], received_at: datetime) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "ts": r.ts,
        "state": r.state.value,
        "model_version": r.model_version,
        "release": r.release,
        "rollout_id": r.rollout_id,
        "target_release": r.target_release,
        "reason": _clean(r.reason),
        "received_at": received_at,
        "dropped": list(dropped) or None,
    }
