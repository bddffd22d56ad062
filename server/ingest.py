"""The ingest writer: drains device status/metrics from a queue and writes them in batches.

Sources are the MQTT bridge (raw payload bytes) and the HTTP fallback endpoints (already parsed
reports). One batch (up to ``batch_max`` messages or ``batch_wait_s``) is one transaction: bulk
insert of metrics and status events, one UPDATE per device, one per rollout device. A message that
does not parse, names another device than its topic, or comes from an unregistered device is
counted and logged; it never stops the thread. If a batch fails to write, its messages are retried
one by one so a single poison message cannot drop the others.
"""

from __future__ import annotations

import logging
import queue
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Boolean, Table, and_, bindparam, case, func, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from contract import MessageError, MetricsReport, StatusReport
from server.background import Worker
from server.db import Device, DeviceEvent, DeviceMetric, Rollout, RolloutDevice, utcnow
from server.db_quality import ClassMetric, ShadowMetric
from server.errors import UnavailableError
from server.mqtt_bridge import IngestItem
from server.rollout import SHADOW_STATE, SUCCESS_STATES, TERMINAL_STATES

log = logging.getLogger(__name__)

MAX_INT32 = 2**31 - 1
MAX_COUNT = 2**62
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Report = StatusReport | MetricsReport


class InvalidReport(Exception):
    """Internal: a message that cannot be stored (the text says why)."""


@dataclass
class IngestStats:
    received: int = 0
    status_written: int = 0
    metrics_written: int = 0
    invalid: int = 0
    unknown_device: int = 0
    batches: int = 0
    failed_writes: int = 0
    batch_fallbacks: int = 0  # batches that failed whole and were rewritten one by one
    last_error: str | None = None


def parse_item(kind: str, topic_device: str, payload: Any) -> Report:
    """Parse and range-check one message. Raises InvalidReport."""
    if isinstance(payload, StatusReport | MetricsReport):
        report: Report = payload
    else:
        cls = StatusReport if kind == "status" else MetricsReport
        try:
            report = cls.from_dict(payload)
        except MessageError as exc:
            raise InvalidReport(str(exc)) from exc
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidReport(f"unparseable {kind} message: {exc}") from exc
    check_report(report)
    if report.device_id != topic_device:
        raise InvalidReport(
            f"payload device_id {report.device_id!r} does not match the topic's {topic_device!r}"
        )
    return report


def check_report(report: Report) -> None:
    """Reject values the database cannot hold (so one message cannot fail a whole batch)."""
    if len(report.model_line) > 64 or _CONTROL.search(report.model_line):
        raise InvalidReport("model_line must be at most 64 printable characters")
    if isinstance(report, StatusReport):
        ints = {
            "model_version": report.model_version,
            "release": report.release,
            "rollout_id": report.rollout_id,
            "target_release": report.target_release,
        }
    else:
        ints = {"model_version": report.model_version, "rollout_id": report.rollout_id}
        for name in ("inferences", "errors", "labelled", "correct"):
            if getattr(report, name) > MAX_COUNT:
                raise InvalidReport(f"{name} is out of range")
        shadow = report.shadow
        if shadow is not None:
            ints["shadow.model_version"] = shadow.model_version
            for name in ("compared", "labelled", "errors"):
                if getattr(shadow, name) > MAX_COUNT:
                    raise InvalidReport(f"shadow.{name} is out of range")
        # Other counts are bounded by these (agreed <= compared, correct and per-class counts
        # <= labelled: checked when parsed).
    for name, value in ints.items():
        if value is not None and not 0 <= value <= MAX_INT32:
            raise InvalidReport(f"{name} {value} is out of range")


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
    ) -> None:
        self.sessions = sessions
        self.queue = ingest_queue
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self.stats = IngestStats()
        self._worker = Worker(
            "ingest-writer", self._step, error_wait_s=0.0, on_error=self._record_error
        )

    def submit(self, kind: str, report: Report) -> None:
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
        self.stats.received += len(batch)
        parsed: list[tuple[Report, datetime]] = []
        for kind, device_id, payload, received_at in batch:
            try:
                parsed.append((parse_item(kind, device_id, payload), received_at))
            except InvalidReport as exc:
                self.stats.invalid += 1
                log.info("dropped %s message for %s: %s", kind, device_id, exc)
        if not parsed:
            return
        try:
            self._write(parsed)
        except SQLAlchemyError as exc:
            self.stats.batch_fallbacks += 1
            log.warning("batch of %d failed (%s); retrying one by one", len(parsed), exc)
            for item in parsed:
                try:
                    self._write([item])
                except SQLAlchemyError as one_exc:
                    self.stats.failed_writes += 1
                    self.stats.last_error = str(one_exc)[:500]
                    log.error("could not store report from %s: %s", item[0].device_id, one_exc)

    def _write(self, items: list[tuple[Report, datetime]]) -> None:
        with self.sessions() as session:
            ids = {r.device_id for r, _ in items}
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
            events: list[dict[str, Any]] = []
            seen: dict[str, datetime] = {}
            last_status: dict[str, tuple[StatusReport, datetime]] = {}
            for report, received_at in items:
                line = lines.get(report.device_id)
                if line is None:
                    self.stats.unknown_device += 1
                    continue
                if report.model_line != line:
                    self.stats.invalid += 1
                    continue
                seen[report.device_id] = max(received_at, seen.get(report.device_id, received_at))
                if isinstance(report, MetricsReport):
                    metrics.append(_metric_row(report, received_at))
                    classes.extend(_class_rows(report, received_at))
                    if report.shadow is not None:
                        shadows.append(_shadow_row(report, received_at))
                else:
                    events.append(_event_row(report, received_at))
                    prev = last_status.get(report.device_id)
                    if prev is None or report.ts >= prev[0].ts:
                        last_status[report.device_id] = (report, received_at)
            if metrics:
                session.execute(insert(DeviceMetric), metrics)
            if classes:
                session.execute(insert(ClassMetric), classes)
            if shadows:
                session.execute(insert(ShadowMetric), shadows)
            if events:
                session.execute(insert(DeviceEvent), events)
            self._update_devices(session, seen, last_status)
            self._update_rollout_devices(session, items, lines)
            session.commit()
            self.stats.metrics_written += len(metrics)
            self.stats.status_written += len(events)
            self.stats.batches += 1

    @staticmethod
    def _update_devices(
        session: Session,
        seen: dict[str, datetime],
        last_status: dict[str, tuple[StatusReport, datetime]],
    ) -> None:
        dev = cast(Table, Device.__table__)
        seen_only = [{"d_id": d, "seen": t} for d, t in seen.items() if d not in last_status]
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
            for d, (r, _) in last_status.items()
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

    @staticmethod
    def _update_rollout_devices(
        session: Session, items: list[tuple[Report, datetime]], lines: dict[str, str]
    ) -> None:
        """Move rollout_devices rows for status reports that are about a rollout's release."""
        statuses = [
            (r, t)
            for r, t in items
            if isinstance(r, StatusReport)
            and r.device_id in lines
            and (r.rollout_id is not None or r.target_release is not None)
        ]
        if not statuses:
            return
        rollouts = session.execute(
            select(Rollout.id, Rollout.model_line, Rollout.release, Rollout.to_version).where(
                or_(
                    Rollout.id.in_({r.rollout_id for r, _ in statuses if r.rollout_id}),
                    Rollout.release.in_(
                        {r.target_release for r, _ in statuses if r.target_release}
                    ),
                )
            )
        ).all()
        by_id = {ro.id: ro for ro in rollouts}
        by_release = {(ro.model_line, ro.release): ro for ro in rollouts}
        latest: dict[tuple[int, str], tuple[StatusReport, datetime]] = {}
        for report, received_at in statuses:
            ro = by_id.get(report.rollout_id) if report.rollout_id is not None else None
            if ro is None:
                ro = by_release.get((report.model_line, report.target_release))
            if ro is None or ro.release is None:
                continue
            if report.target_release is not None and report.target_release != ro.release:
                continue  # about another release (e.g. the rollback), not this rollout's
            if report.state.value in SUCCESS_STATES and report.model_version != ro.to_version:
                continue
            key = (ro.id, report.device_id)
            if key not in latest or report.ts >= latest[key][0].ts:
                latest[key] = (report, received_at)
        if not latest:
            return
        rd = cast(Table, RolloutDevice.__table__)
        stmt = (
            update(rd)
            .where(
                rd.c.rollout_id == bindparam("r_id"),
                rd.c.device_id == bindparam("d_id"),
                # Plain comparisons: an IN list cannot be expanded inside an executemany.
                or_(
                    and_(*(rd.c.state != s for s in sorted(SUCCESS_STATES))),
                    bindparam("terminal", type_=Boolean),
                ),
            )
            .values(
                state=bindparam("st"),
                updated_at=bindparam("now"),
                reason=bindparam("why"),
                installed_at=case(
                    (
                        bindparam("ok", type_=Boolean),
                        func.coalesce(rd.c.installed_at, bindparam("now")),
                    ),
                    else_=rd.c.installed_at,
                ),
            )
        )
        session.execute(
            stmt,
            [
                {
                    "r_id": rid,
                    "d_id": did,
                    "st": r.state.value,
                    "now": t,
                    "why": _clean(r.reason),
                    "ok": r.state.value in SUCCESS_STATES or r.state.value == SHADOW_STATE,
                    "terminal": r.state.value in TERMINAL_STATES,
                }
                for (rid, did), (r, t) in latest.items()
            ],
        )

    # ------------------------------------------------------------ thread

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


def _event_row(r: StatusReport, received_at: datetime) -> dict[str, Any]:
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
    }
