"""Applies rollout decisions: operator actions, a ticker, and publishing targets.

Every transition is a guarded ``UPDATE rollouts SET state = ... WHERE id = ? AND state = ?``:
whoever wins the update performs the side effects, so a restart or a second server instance
never advances or rolls back twice. The state is committed before targets are published.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from server import crud
from server.core.config import Settings
from server.db import DeviceMetric, ModelLine, ModelVersion, Rollout, RolloutDevice, utcnow
from server.errors import ConflictError, NotFoundError
from server.mqtt_bridge import TargetPublisher
from server.rollout import (
    ACTIVE_ROLLOUT_STATES,
    SUCCESS_STATES,
    TERMINAL_STATES,
    Action,
    Decision,
    MetricSummary,
    StageSnapshot,
    Thresholds,
    decide,
    plan_canary,
)
from server.signing import Signer, sign_release
from server.targets import active_rollout, targets_for_line

log = logging.getLogger(__name__)


def thresholds_from(settings: Settings) -> Thresholds:
    return Thresholds(
        min_labelled=settings.min_labelled,
        max_accuracy_drop=settings.max_accuracy_drop,
        max_error_rate=settings.max_error_rate,
        max_latency_ratio=settings.max_latency_ratio,
        latency_slack_ms=settings.latency_slack_ms,
        canary_min_soak_s=settings.canary_min_soak_s,
        install_timeout_s=settings.install_timeout_s,
        max_failed_ratio=settings.max_failed_ratio,
    )


def create_rollout(
    session: Session,
    *,
    line: str,
    to_version: int,
    canary_percent: int,
    created_by: str,
    now: datetime,
) -> Rollout:
    """Add a rollout in ``pending_approval`` under the line's row lock; flushes only.

    Raises:
        NotFoundError: unknown line or version.
        ConflictError: the line has an active rollout or no champion, or the version is
            rejected, retired or already the champion.
    """
    model_line = crud.lock_model_line(session, name=line)
    version = crud.get_version(session, line=line, version=to_version)
    if version.status in ("rejected", "retired"):
        raise ConflictError(f"version {to_version} of {line!r} is {version.status}")
    if model_line.champion_version is None:
        raise ConflictError(f"model line {line!r} has no champion to roll out from")
    if model_line.champion_version == to_version:
        raise ConflictError(f"version {to_version} is already the champion of {line!r}")
    existing = active_rollout(session, line=line)
    if existing is not None:
        raise ConflictError(
            f"model line {line!r} already has rollout {existing.id} in state {existing.state}"
        )
    rollout = Rollout(
        model_line=line,
        from_version=model_line.champion_version,
        to_version=to_version,
        state="pending_approval",
        stage=0,
        canary_percent=canary_percent,
        created_by=created_by,
        created_at=now,
    )
    session.add(rollout)
    session.flush()
    return rollout


class RolloutEngine:
    """Operator actions on rollouts and the periodic ``tick`` that applies ``decide``."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        signer: Signer,
        publisher: TargetPublisher,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.signer = signer
        self.publisher = publisher
        self.clock = clock
        self.thresholds = thresholds_from(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ operator actions

    def create(
        self, *, model_line: str, model_version: int, canary_percent: int | None, created_by: str
    ) -> Rollout:
        with self.sessions() as session:
            rollout = create_rollout(
                session,
                line=model_line,
                to_version=model_version,
                canary_percent=canary_percent or self.settings.canary_percent,
                created_by=created_by,
                now=self.clock(),
            )
            session.commit()
            return rollout

    def _conflict(self, session: Session, rollout_id: int, action: str, allowed: str) -> None:
        rollout = session.get(Rollout, rollout_id, populate_existing=True)
        if rollout is None:
            raise NotFoundError(f"unknown rollout {rollout_id}")
        raise ConflictError(
            f"rollout {rollout_id} is {rollout.state}; only a rollout that is {allowed} can be "
            f"{action}"
        )

    def _guarded(
        self, session: Session, rollout_id: int, states: Sequence[str], **values: Any
    ) -> bool:
        res = session.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id, Rollout.state.in_(states))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def approve(self, rollout_id: int, *, approver: str, now: datetime | None = None) -> Rollout:
        """Release the canary: sign the new version and target the canary devices only."""
        now = now or self.clock()
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout_id,
                ["pending_approval"],
                state="canary",
                approved_by=approver,
                approved_at=now,
                stage=0,
                stage_started_at=now,
                reason="canary released",
            ):
                self._conflict(session, rollout_id, "approved", "pending_approval")
            rollout = session.get(Rollout, rollout_id, populate_existing=True)
            assert rollout is not None
            if rollout.release is None:
                release = sign_release(
                    session,
                    signer=self.signer,
                    line_name=rollout.model_line,
                    model_version=rollout.to_version,
                    now=now,
                    ttl_days=self.settings.manifest_ttl_days,
                )
                rollout.release = release.release
            canary = self._add_stage(session, rollout, stage=0, now=now)
            session.commit()
        self._publish(rollout.model_line, canary)
        return rollout

    def _add_stage(
        self, session: Session, rollout: Rollout, *, stage: int, now: datetime
    ) -> list[str]:
        """Insert rollout_devices rows for a stage (canary plan, or everyone not yet in)."""
        line_devices = crud.device_ids_of_line(session, model_line=rollout.model_line)
        already = set(
            session.scalars(
                select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
            ).all()
        )
        if stage == 0:
            chosen = plan_canary(rollout.id, line_devices, rollout.canary_percent)
        else:
            chosen = sorted(set(line_devices))
        chosen = [d for d in chosen if d not in already]
        if chosen:
            session.execute(
                insert(RolloutDevice),
                [
                    {
                        "rollout_id": rollout.id,
                        "device_id": d,
                        "stage": stage,
                        "state": "notified",
                        "updated_at": now,
                    }
                    for d in chosen
                ],
            )
        return chosen

    def pause(self, rollout_id: int, *, now: datetime | None = None) -> Rollout:
        now = now or self.clock()
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout_id,
                ["canary", "full"],
                paused_state=Rollout.state,
                state="paused",
                paused_at=now,
                reason="paused",
            ):
                self._conflict(session, rollout_id, "paused", "canary or full")
            session.commit()
            return self.get(session, rollout_id)

    def resume(self, rollout_id: int, *, now: datetime | None = None) -> Rollout:
        now = now or self.clock()
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout_id,
                ["paused"],
                state=func.coalesce(Rollout.paused_state, "canary"),
                paused_state=None,
                stage_started_at=now,
                reason="resumed",
            ):
                self._conflict(session, rollout_id, "resumed", "paused")
            session.commit()
            return self.get(session, rollout_id)

    def abort(
        self, rollout_id: int, *, by: str, reason: str | None, now: datetime | None = None
    ) -> Rollout:
        """Abort: a rollout not yet approved just ends; a released one is rolled back."""
        now = now or self.clock()
        why = f"aborted by {by}" + (f": {reason}" if reason else "")
        with self.sessions() as session:
            if self._guarded(
                session,
                rollout_id,
                ["pending_approval"],
                state="aborted",
                finished_at=now,
                reason=why,
            ):
                session.commit()
                return self.get(session, rollout_id)
        if not self._rollback(
            rollout_id, reason=why, from_states=("canary", "full", "paused"), now=now
        ):
            with self.sessions() as session:
                self._conflict(
                    session, rollout_id, "aborted", "pending_approval, canary, full or paused"
                )
        with self.sessions() as session:
            return self.get(session, rollout_id)

    @staticmethod
    def get(session: Session, rollout_id: int) -> Rollout:
        rollout = session.get(Rollout, rollout_id, populate_existing=True)
        if rollout is None:
            raise NotFoundError(f"unknown rollout {rollout_id}")
        return rollout

    # ------------------------------------------------------------ transitions

    def _rollback(
        self, rollout_id: int, *, reason: str, from_states: Sequence[str], now: datetime
    ) -> bool:
        """Sign a new, higher release of the old version and send everyone back to it."""
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout_id,
                from_states,
                state="rolled_back",
                paused_state=None,
                finished_at=now,
                reason=reason,
            ):
                return False
            rollout = self.get(session, rollout_id)
            line = rollout.model_line
            assert rollout.from_version is not None
            release = sign_release(
                session,
                signer=self.signer,
                line_name=line,
                model_version=rollout.from_version,
                now=now,
                ttl_days=self.settings.manifest_ttl_days,
            )
            rollout.rollback_release = release.release
            session.execute(
                update(ModelLine)
                .where(ModelLine.name == line)
                .values(current_release=release.release)
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(ModelVersion)
                .where(
                    ModelVersion.line == line,
                    ModelVersion.version == rollout.to_version,
                    ModelVersion.status == "candidate",
                )
                .values(status="rejected", reason=f"rollout {rollout_id}: {reason}")
                .execution_options(synchronize_session=False)
            )
            session.commit()
        log.warning("rollout %s rolled back: %s", rollout_id, reason)
        self._publish(line, None)
        return True

    def _advance(self, rollout: Rollout, decision: Decision, now: datetime) -> None:
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout.id,
                ["canary"],
                state="full",
                stage=1,
                full_at=now,
                stage_started_at=now,
                reason=decision.reason,
                gates=decision.gates,
            ):
                return
            rest = self._add_stage(session, rollout, stage=1, now=now)
            session.commit()
        log.info("rollout %s advanced to full: %s", rollout.id, decision.reason)
        self._publish(rollout.model_line, rest)

    def _complete(self, rollout: Rollout, decision: Decision, now: datetime) -> None:
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout.id,
                ["full"],
                state="completed",
                finished_at=now,
                reason=decision.reason,
                gates=decision.gates,
            ):
                return
            line = rollout.model_line
            session.execute(
                update(ModelVersion)
                .where(ModelVersion.line == line, ModelVersion.status == "champion")
                .values(status="retired")
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(ModelVersion)
                .where(ModelVersion.line == line, ModelVersion.version == rollout.to_version)
                .values(status="champion")
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(ModelLine)
                .where(ModelLine.name == line)
                .values(champion_version=rollout.to_version, current_release=rollout.release)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        log.info("rollout %s completed: %s", rollout.id, decision.reason)

    def _publish(self, line: str, device_ids: list[str] | None) -> None:
        if device_ids is not None and not device_ids:
            return
        with self.sessions() as session:
            targets = targets_for_line(
                session, line=line, public_url=self.settings.public_url, device_ids=device_ids
            )
        for device_id, message in targets:
            self.publisher.publish(device_id, message)

    def publish_all_targets(self) -> int:
        """Re-announce every device's target (at startup: covers a crash between commit and
        publish). Returns the number of messages queued."""
        with self.sessions() as session:
            lines = [ml.name for ml in crud.list_model_lines(session)]
        count = 0
        for line in lines:
            with self.sessions() as session:
                targets = targets_for_line(session, line=line, public_url=self.settings.public_url)
            for device_id, message in targets:
                self.publisher.publish(device_id, message)
                count += 1
        return count

    # ------------------------------------------------------------ the ticker

    def tick(self, now: datetime | None = None) -> dict[int, Decision]:
        """Evaluate every rollout in canary or full once and apply the decisions."""
        now = now or self.clock()
        with self.sessions() as session:
            rollouts = session.scalars(
                select(Rollout).where(Rollout.state.in_(("canary", "full"))).order_by(Rollout.id)
            ).all()
        decisions: dict[int, Decision] = {}
        for rollout in rollouts:
            decisions[rollout.id] = self._tick_one(rollout, now)
        return decisions

    def _tick_one(self, rollout: Rollout, now: datetime) -> Decision:
        stage = 1 if rollout.state == "full" else 0
        with self.sessions() as session:
            added: list[str] = []
            if stage == 1:  # devices registered since the rollout went full join stage 1
                added = self._add_stage(session, rollout, stage=1, now=now)
            elif not session.scalar(
                select(func.count()).where(RolloutDevice.rollout_id == rollout.id)
            ):  # approved while the line had no devices: plan the canary now
                added = self._add_stage(session, rollout, stage=0, now=now)
            session.commit()
        self._publish(rollout.model_line, added)
        with self.sessions() as session:
            snap = self._snapshot(session, rollout, stage=stage, now=now)
        decision = decide(snap, self.thresholds)
        with self.sessions() as session:
            if decision.timed_out:
                session.execute(
                    update(RolloutDevice)
                    .where(
                        RolloutDevice.rollout_id == rollout.id,
                        RolloutDevice.device_id.in_(decision.timed_out),
                        RolloutDevice.state.not_in(TERMINAL_STATES),
                    )
                    .values(
                        state="timed_out",
                        updated_at=now,
                        reason=f"no install report within {self.thresholds.install_timeout_s:g} s",
                    )
                    .execution_options(synchronize_session=False)
                )
            if decision.action is Action.WAIT:
                self._guarded(
                    session,
                    rollout.id,
                    [rollout.state],
                    reason=decision.reason,
                    gates=decision.gates,
                )
            session.commit()
        if decision.action is Action.ROLLBACK:
            self._rollback(
                rollout.id, reason=decision.reason, from_states=(rollout.state,), now=now
            )
            with self.sessions() as session:
                session.execute(
                    update(Rollout)
                    .where(Rollout.id == rollout.id)
                    .values(gates=decision.gates)
                    .execution_options(synchronize_session=False)
                )
                session.commit()
        elif decision.action is Action.ADVANCE:
            if stage == 0:
                self._advance(rollout, decision, now)
            else:
                self._complete(rollout, decision, now)
        return decision

    def _snapshot(
        self, session: Session, rollout: Rollout, *, stage: int, now: datetime
    ) -> StageSnapshot:
        rows = session.execute(
            select(RolloutDevice.device_id, RolloutDevice.state, RolloutDevice.installed_at).where(
                RolloutDevice.rollout_id == rollout.id, RolloutDevice.stage == stage
            )
        ).all()
        states = {r.device_id: r.state for r in rows}
        installs = [r.installed_at for r in rows if r.installed_at and r.state in SUCCESS_STATES]
        started = rollout.stage_started_at or rollout.approved_at or now
        snap = StageSnapshot(
            stage=stage,
            now=now.timestamp(),
            stage_started_at=started.timestamp(),
            device_states=states,
            last_installed_at=max(installs).timestamp() if installs else None,
        )
        if stage == 1:
            return snap
        canary_ids = list(states)
        rd = RolloutDevice
        canary = self._summary(
            session,
            select(*_SUMS)
            .join(
                rd,
                and_(
                    rd.device_id == DeviceMetric.device_id,
                    rd.rollout_id == rollout.id,
                    rd.stage == 0,
                ),
            )
            .where(
                DeviceMetric.model_line == rollout.model_line,
                DeviceMetric.model_version == rollout.to_version,
                rd.installed_at.is_not(None),
                DeviceMetric.received_at >= rd.installed_at,
                DeviceMetric.received_at <= now,
            ),
        )
        period_start = min(installs) if installs else started
        control = self._summary(
            session,
            select(*_SUMS).where(
                DeviceMetric.model_line == rollout.model_line,
                DeviceMetric.model_version == rollout.from_version,
                DeviceMetric.device_id.not_in(canary_ids),
                DeviceMetric.received_at >= period_start,
                DeviceMetric.received_at <= now,
            ),
        )
        baseline = self._summary(
            session,
            select(*_SUMS).where(
                DeviceMetric.model_line == rollout.model_line,
                DeviceMetric.model_version == rollout.from_version,
                DeviceMetric.device_id.in_(canary_ids),
                DeviceMetric.received_at < (rollout.approved_at or started),
            ),
        )
        return StageSnapshot(
            stage=0,
            now=snap.now,
            stage_started_at=snap.stage_started_at,
            device_states=states,
            last_installed_at=snap.last_installed_at,
            canary=canary,
            control=control,
            baseline=baseline,
        )

    @staticmethod
    def _summary(session: Session, stmt: Any) -> MetricSummary:
        row = session.execute(stmt).one()
        inferences = int(row[0] or 0)
        return MetricSummary(
            inferences=inferences,
            errors=int(row[1] or 0),
            labelled=int(row[2] or 0),
            correct=int(row[3] or 0),
            p95_ms=(float(row[4]) / inferences) if inferences and row[4] is not None else None,
        )

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the ticker must survive a bad tick (DB blip); next tick retries
                log.exception("rollout tick failed")
            self._stop.wait(self.settings.rollout_tick_s)


_SUMS = (
    func.sum(DeviceMetric.inferences),
    func.sum(DeviceMetric.errors),
    func.sum(DeviceMetric.labelled),
    func.sum(DeviceMetric.correct),
    func.sum(DeviceMetric.p95 * DeviceMetric.inferences),
)

__all__ = ["ACTIVE_ROLLOUT_STATES", "RolloutEngine", "create_rollout", "thresholds_from"]
