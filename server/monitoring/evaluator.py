"""The monitoring evaluator: closes windows in order, per model line, and records what they show.

Windows are ``monitor_window_s`` long and aligned on the epoch (window ``k`` is
``[k*W, (k+1)*W)`` of the server's receive clock); window ``k`` is evaluated once
``(k+1)*W + monitor_close_delay_s`` has passed, so the reports the ingest writer still had in a
batch are in. A line's cursor (``monitor_cursors``) names its first window not yet evaluated.
A window is gathered and scored (``server.monitoring.windows``) in a read-only transaction, so
no write lock is held while thresholds calibrate (on SQLite the ingest writer keeps writing);
then one short write transaction locks the cursor row, checks it still names this window,
records the figures and the alert transitions (``server.monitoring.alerts``) and moves the
cursor on. Several server processes on one PostgreSQL therefore record each window exactly
once: the second finds the cursor moved and drops its work. A window whose evaluation raises
(anything but a database outage) is logged, counted and skipped, so it cannot stall its line.

Windows without any report are skipped in one step (the cursor jumps to the next window that has
one). A line's cursor starts at the window of its oldest stored summary, or at the current window:
history from before monitoring is not replayed into alerts. Summaries older than
``monitor_retention_s`` whose windows were evaluated are deleted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.core.background import Worker
from server.core.config import Settings
from server.db.base import utcnow
from server.db.fleet import DeviceMetric
from server.db.monitoring import MonitorCursor, MonitorSummaryRow
from server.db.registry import ModelLine
from server.monitoring.alerts import AlertConfig, RetrainHook, WindowOutcome, record_window
from server.monitoring.references import ReferenceBook
from server.monitoring.windows import gather

log = logging.getLogger(__name__)


def _ts(t: datetime) -> float:
    return t.timestamp()


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class MonitorEvaluator:
    """Evaluates closed windows; ``run_once`` is what the thread calls (tests call it too).

    Args:
        on_raised: the retraining hook handed to ``record_window`` (see there).
        wake_webhook, wake_jobs: called after a commit that queued deliveries or jobs.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        references: ReferenceBook,
        read_sessions: sessionmaker[Session] | None = None,  # reads that take no write lock
        clock: Callable[[], datetime] = utcnow,
        on_raised: RetrainHook | None = None,
        wake_webhook: Callable[[], None] | None = None,
        wake_jobs: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.config = AlertConfig.from_settings(settings)  # ConfigError: refuses to start
        self.sessions = sessions
        self.read_sessions = read_sessions or sessions
        self.references = references
        self.clock = clock
        self.on_raised = on_raised
        self.wake_webhook = wake_webhook
        self.wake_jobs = wake_jobs
        self.window_s = settings.monitor_window_s
        self.windows_evaluated = 0
        self.windows_failed = 0  # windows whose evaluation raised (skipped, logged)
        self.last_error: str | None = None
        self._worker = Worker(
            "monitor-evaluator",
            self._step,
            error_wait_s=settings.monitor_tick_s,
            on_error=self._record_error,
        )

    # ------------------------------------------------------------ windows

    def _start_of(self, ts: float) -> float:
        return math.floor(ts / self.window_s) * self.window_s

    def _first_open(self, now: datetime) -> float:
        """Start of the first window that is not closed yet at ``now``."""
        return self._start_of(_ts(now) - self.settings.monitor_close_delay_s)

    def run_once(self) -> int:
        """Evaluate every closed window of every line (at most ``monitor_max_windows_per_tick``
        per line); prune old summaries. Returns the number of windows evaluated."""
        now = self.clock()
        with self.read_sessions() as session:
            lines = list(session.scalars(select(ModelLine.name).order_by(ModelLine.name)))
        done = 0
        for line in lines:
            done += self._line(line, now)
        self._prune(lines, now)
        self.windows_evaluated += done
        return done

    def _line(self, line: str, now: datetime) -> int:
        first_open = self._first_open(now)
        done = 0
        for _ in range(self.settings.monitor_max_windows_per_tick):
            planned = self._plan(line, first_open)
            if planned is None:
                return done
            at, start = planned
            outcome = self._evaluate(line, at, start, now)
            if outcome is not None:
                done += 1
                self._after(line, start, outcome)
        return done

    def _plan(self, line: str, first_open: float) -> tuple[datetime, float] | None:
        """The line's cursor and the start of its next closed window that has reports, or None
        when every closed window is done. Creates the cursor when missing (at the window of the
        oldest stored summary, or the current one) and moves it over empty windows."""
        data_at: datetime | None = None
        with self.read_sessions() as session:
            at = session.scalar(
                select(MonitorCursor.next_window_start).where(MonitorCursor.model_line == line)
            )
            if at is None:
                oldest = session.scalar(
                    select(func.min(MonitorSummaryRow.received_at)).where(
                        MonitorSummaryRow.model_line == line
                    )
                )
                begin = first_open if oldest is None else self._start_of(_ts(oldest))
                at = _at(min(first_open, begin))
                created = self._move(line, None, at)
                if not created:
                    return None  # another server process created it: the next tick goes on
            if _ts(at) >= first_open:
                return None
            data_at = self._next_data(session, line, at)
        if data_at is None or self._start_of(_ts(data_at)) >= first_open:
            self._move(line, at, _at(first_open))  # every closed window is empty
            return None
        return at, max(_ts(at), self._start_of(_ts(data_at)))

    def _move(self, line: str, expected: datetime | None, to: datetime) -> bool:
        """Set the line's cursor to ``to`` if it still is ``expected`` (None: create it).
        False when another server process got there first."""
        with self.sessions() as session:
            if expected is None:
                try:
                    with session.begin_nested():
                        session.add(MonitorCursor(model_line=line, next_window_start=to))
                except IntegrityError:
                    session.rollback()
                    return False
                session.commit()
                return True
            moved = session.execute(
                update(MonitorCursor)
                .where(
                    MonitorCursor.model_line == line, MonitorCursor.next_window_start == expected
                )
                .values(next_window_start=to)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            return bool(moved.rowcount)  # type: ignore[attr-defined]

    def _evaluate(
        self, line: str, at: datetime, start: float, now: datetime
    ) -> WindowOutcome | None:
        """Gather and score the window in a read-only transaction (no lock held while the
        thresholds calibrate), then record it and move the cursor in a short write transaction
        under the cursor's row lock. None: another process evaluated it, or it failed (skipped,
        logged); a database outage raises (the next tick tries again)."""
        begin, end = _at(start), _at(start + self.window_s)
        try:
            with self.read_sessions() as session:
                windows = gather(
                    session, line=line, start=begin, end=end, references=self.references
                )
            with self.sessions() as session:
                cursor = session.scalar(
                    select(MonitorCursor)
                    .where(MonitorCursor.model_line == line)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                )
                if cursor is None or cursor.next_window_start != at:
                    return None  # another server process evaluated it meanwhile
                outcome = record_window(
                    session,
                    line=line,
                    start=begin,
                    end=end,
                    windows=windows,
                    config=self.config,
                    now=now,
                    public_url=self.settings.public_url,
                    on_raised=self.on_raised,
                )
                cursor.next_window_start = end
                session.commit()
                return outcome
        except (OperationalError, InterfaceError):
            raise  # the database, not the window
        except Exception as exc:  # noqa: BLE001 - one bad window must not stop the line
            self.windows_failed += 1
            self._record_error(exc)
            log.exception("%s window %s could not be evaluated; skipped", line, begin)
            self._move(line, at, end)
            return None

    @staticmethod
    def _next_data(session: Session, line: str, since: datetime) -> datetime | None:
        """When the first summary or metrics report at or after ``since`` was received."""
        found = [
            session.scalar(
                select(func.min(MonitorSummaryRow.received_at)).where(
                    MonitorSummaryRow.model_line == line, MonitorSummaryRow.received_at >= since
                )
            ),
            session.scalar(
                select(func.min(DeviceMetric.received_at)).where(
                    DeviceMetric.model_line == line, DeviceMetric.received_at >= since
                )
            ),
        ]
        present = [t for t in found if t is not None]
        return min(present) if present else None

    def _after(self, line: str, start: float, outcome: WindowOutcome) -> None:
        if outcome.raised or outcome.cleared:
            log.warning(
                "%s window %s: alerts raised %s, cleared %s, training jobs %s",
                line,
                _at(start).isoformat(),
                outcome.raised,
                outcome.cleared,
                outcome.jobs,
            )
        if outcome.deliveries and self.wake_webhook is not None:
            self.wake_webhook()
        if outcome.jobs and self.wake_jobs is not None:
            self.wake_jobs()

    def _prune(self, lines: list[str], now: datetime) -> None:
        """Delete summaries past retention whose windows were evaluated."""
        keep_after = now - timedelta(seconds=self.settings.monitor_retention_s)
        with self.sessions() as session:
            cursors = dict(
                session.execute(select(MonitorCursor.model_line, MonitorCursor.next_window_start))
                .tuples()
                .all()
            )
            for line in lines:
                cursor = cursors.get(line)
                if cursor is None:
                    continue
                session.execute(
                    delete(MonitorSummaryRow).where(
                        MonitorSummaryRow.model_line == line,
                        MonitorSummaryRow.received_at < min(cursor, keep_after),
                    )
                )
            session.commit()

    # ------------------------------------------------------------ thread

    @property
    def running(self) -> bool:
        return self._worker.running

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop(timeout=30)

    def _step(self) -> float:
        self.run_once()
        return self.settings.monitor_tick_s

    def _record_error(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]


__all__ = ["MonitorEvaluator"]
