"""Applies rollout decisions: operator actions, a ticker, and publishing targets.

Every transition is a guarded ``UPDATE rollouts SET ... WHERE id = ? AND state = ? AND stage = ?``:
whoever wins the update performs the side effects, so a restart or a second server instance
never advances or rolls back twice; starting a wave also inserts its ``rollout_waves`` row, whose
primary key refuses a second start outright. The state is committed before targets are
published; at startup every target is announced again (``publish_all_targets``), which covers a
crash between the two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from server import crud
from server.background import Worker
from server.core.config import Settings
from server.db import Device, ModelLine, ModelVersion, Rollout, utcnow
from server.db_rollouts import RolloutWave
from server.errors import ConflictError, NotFoundError
from server.mqtt_bridge import TargetPublisher
from server.rollout import (
    RUNNING_ROLLOUT_STATES,
    Action,
    Decision,
    decide,
    state_for_wave,
)
from server.rollout_members import (
    count_failures,
    log_events,
    mark_timed_out,
    retry,
    sync_members,
    touch_in_progress,
)
from server.rollout_plan import Plan
from server.rollout_queries import (
    bounds_from,
    build_snapshot,
    create_rollout,
    plan_from_request,
    plan_of,
    retries_from,
)
from server.signing import Signer, sign_release
from server.targets import targets_for_line

log = logging.getLogger(__name__)
RELEASED_STATES = (*RUNNING_ROLLOUT_STATES, "awaiting_gate")


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
        self.bounds = bounds_from(settings)
        self.retries = retries_from(settings)
        self._worker = Worker("rollout-engine", self._step)

    # ------------------------------------------------------------ operator actions

    def create(
        self,
        *,
        model_line: str,
        model_version: int,
        canary_percent: int | None,
        created_by: str,
        waves: list[dict[str, Any]] | None = None,
    ) -> Rollout:
        """A rollout in pending_approval. Raises InvalidRequestError for a bad plan."""
        plan = plan_from_request(self.settings, canary_percent=canary_percent, waves=waves)
        with self.sessions() as session:
            rollout = create_rollout(
                session,
                line=model_line,
                to_version=model_version,
                canary_percent=canary_percent or self.settings.canary_percent,
                created_by=created_by,
                now=self.clock(),
                plan=plan,
            )
            log_events(
                session,
                rollout.id,
                [(None, None, "pending_approval", "created")],
                now=self.clock(),
                by=created_by,
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
        self,
        session: Session,
        rollout_id: int,
        states: Sequence[str],
        *,
        at_stage: int | None = None,
        **values: Any,
    ) -> bool:
        """``UPDATE rollouts SET values WHERE id AND state IN states [AND stage = at_stage]``."""
        stmt = update(Rollout).where(Rollout.id == rollout_id, Rollout.state.in_(states))
        if at_stage is not None:
            stmt = stmt.where(Rollout.stage == at_stage)
        res = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def approve(self, rollout_id: int, *, approver: str, now: datetime | None = None) -> Rollout:
        """Start the first wave (pending_approval) or the next one (awaiting_gate)."""
        now = now or self.clock()
        with self.sessions() as session:
            rollout = self.get(session, rollout_id)
            state, stage = rollout.state, rollout.stage
        if state == "awaiting_gate":
            if not self._start_wave(
                rollout_id,
                stage + 1,
                by=approver,
                now=now,
                from_states=["awaiting_gate"],
                from_stage=stage,
            ):
                with self.sessions() as session:
                    self._conflict(
                        session, rollout_id, "approved", "pending_approval or awaiting_gate"
                    )
        elif not self._release(rollout_id, approver=approver, now=now):
            with self.sessions() as session:
                self._conflict(session, rollout_id, "approved", "pending_approval or awaiting_gate")
        with self.sessions() as session:
            return self.get(session, rollout_id)

    def _release(self, rollout_id: int, *, approver: str, now: datetime) -> bool:
        """pending_approval -> the first wave: freeze the plan, sign, release wave 1."""
        with self.sessions() as session:
            rollout = self.get(session, rollout_id)
            if rollout.state != "pending_approval":
                return False
            devices = {
                d: list(g or ())
                for d, g in session.execute(
                    select(Device.device_id, Device.groups).where(
                        Device.model_line == rollout.model_line
                    )
                ).tuples()
            }
            plan = plan_of(rollout, self.settings).frozen(rollout_id, devices)
            if not self._guarded(
                session,
                rollout_id,
                ["pending_approval"],
                at_stage=0,
                state=state_for_wave(0, plan.last),
                approved_by=approver,
                approved_at=now,
                stage_started_at=now,
                plan=plan.to_dict(),
                reason=f"approved by {approver}: wave 1 ({plan.waves[0].label}) released",
            ):
                return False
            rollout = self.get(session, rollout_id)
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
            session.add(
                RolloutWave(rollout_id=rollout_id, wave=0, started_at=now, started_by=approver)
            )
            log_events(
                session, rollout_id, [(None, 0, "approved", rollout.reason)], now=now, by=approver
            )
            session.flush()
            released = sync_members(session, rollout, plan, now=now, release_upto=0)
            line = rollout.model_line
            session.commit()
        self._publish(line, released)
        return True

    def _start_wave(
        self,
        rollout_id: int,
        wave: int,
        *,
        by: str,
        now: datetime,
        from_states: Sequence[str],
        from_stage: int,
        reason: str | None = None,
    ) -> bool:
        """Move from ``from_stage`` to ``wave`` (guarded) and release its devices."""
        with self.sessions() as session:
            rollout = self.get(session, rollout_id)
            plan = Plan.from_dict(rollout.plan or {})
            why = reason or f"wave {wave + 1} ({plan.waves[wave].label}) released by {by}"
            if not self._guarded(
                session,
                rollout_id,
                from_states,
                at_stage=from_stage,
                state=state_for_wave(wave, plan.last),
                stage=wave,
                stage_started_at=now,
                full_at=now if wave == plan.last else Rollout.full_at,
                reason=why,
            ):
                return False
            self._finish_wave(session, rollout_id, from_stage, "succeeded", now=now)
            session.add(
                RolloutWave(rollout_id=rollout_id, wave=wave, started_at=now, started_by=by)
            )
            log_events(session, rollout_id, [(None, wave, "wave_started", why)], now=now, by=by)
            session.flush()
            rollout = self.get(session, rollout_id)
            released = sync_members(session, rollout, plan, now=now, release_upto=wave)
            line = rollout.model_line
            session.commit()
        log.info("rollout %s: %s", rollout_id, why)
        self._publish(line, released)
        return True

    def _finish_wave(
        self,
        session: Session,
        rollout_id: int,
        wave: int,
        outcome: str,
        *,
        now: datetime,
        reason: str | None = None,
    ) -> None:
        session.execute(
            update(RolloutWave)
            .where(
                RolloutWave.rollout_id == rollout_id,
                RolloutWave.wave == wave,
                RolloutWave.finished_at.is_(None),
            )
            .values(finished_at=now, outcome=outcome, reason=reason)
            .execution_options(synchronize_session=False)
        )

    def pause(
        self,
        rollout_id: int,
        *,
        by: str = "operator",
        reason: str | None = None,
        now: datetime | None = None,
    ) -> Rollout:
        now = now or self.clock()
        why = f"paused by {by}" + (f": {reason}" if reason else "")
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout_id,
                RELEASED_STATES,
                paused_state=Rollout.state,
                state="paused",
                paused_at=now,
                reason=why,
            ):
                self._conflict(
                    session, rollout_id, "paused", "canary, rolling, full or awaiting_gate"
                )
            log_events(session, rollout_id, [(None, None, "paused", why)], now=now, by=by)
            session.commit()
            return self.get(session, rollout_id)

    def resume(
        self, rollout_id: int, *, by: str = "operator", now: datetime | None = None
    ) -> Rollout:
        """Back to where the pause found it; the current wave's error condition is waived
        (the operator accepted its failures) and per-device timeouts restart."""
        now = now or self.clock()
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout_id,
                ["paused"],
                state=func.coalesce(Rollout.paused_state, "canary"),
                paused_state=None,
                reason=f"resumed by {by}",
            ):
                self._conflict(session, rollout_id, "resumed", "paused")
            rollout = self.get(session, rollout_id)
            session.execute(
                update(RolloutWave)
                .where(RolloutWave.rollout_id == rollout_id, RolloutWave.wave == rollout.stage)
                .values(error_override=True)
                .execution_options(synchronize_session=False)
            )
            touch_in_progress(session, rollout_id, now)
            log_events(
                session, rollout_id, [(None, rollout.stage, "resumed", None)], now=now, by=by
            )
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
                log_events(session, rollout_id, [(None, None, "aborted", why)], now=now, by=by)
                session.commit()
                return self.get(session, rollout_id)
        if not self._rollback(
            rollout_id, reason=why, from_states=(*RELEASED_STATES, "paused"), now=now, by=by
        ):
            with self.sessions() as session:
                self._conflict(
                    session,
                    rollout_id,
                    "aborted",
                    "pending_approval, canary, rolling, full, awaiting_gate or paused",
                )
        with self.sessions() as session:
            return self.get(session, rollout_id)

    def rollback(
        self, rollout_id: int, *, by: str, reason: str | None, now: datetime | None = None
    ) -> Rollout:
        """Roll back a released or completed rollout: a new signed release of the previous
        model for everyone; a completed one also gives the champion back."""
        now = now or self.clock()
        why = f"rolled back by {by}" + (f": {reason}" if reason else "")
        if not self._rollback(
            rollout_id,
            reason=why,
            from_states=(*RELEASED_STATES, "paused", "completed"),
            now=now,
            by=by,
        ):
            with self.sessions() as session:
                self._conflict(
                    session,
                    rollout_id,
                    "rolled back",
                    "released (canary, rolling, full, awaiting_gate, paused) or completed",
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
        self,
        rollout_id: int,
        *,
        reason: str,
        from_states: Sequence[str],
        now: datetime,
        by: str = "engine",
    ) -> bool:
        """Sign a new, higher release of the old version and send everyone back to it."""
        with self.sessions() as session:
            before = self.get(session, rollout_id).state
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
            values: dict[str, Any] = {"current_release": release.release}
            if before == "completed":
                values["champion_version"] = rollout.from_version
                for version, status in (
                    (rollout.to_version, "rejected"),
                    (rollout.from_version, "champion"),
                ):
                    session.execute(
                        update(ModelVersion)
                        .where(ModelVersion.line == line, ModelVersion.version == version)
                        .values(
                            status=status,
                            reason=f"rollout {rollout_id}: {reason}"
                            if status == "rejected"
                            else ModelVersion.reason,
                        )
                        .execution_options(synchronize_session=False)
                    )
            session.execute(
                update(ModelLine)
                .where(ModelLine.name == line)
                .values(**values)
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
            self._finish_wave(
                session, rollout_id, rollout.stage, "rolled_back", now=now, reason=reason
            )
            log_events(
                session, rollout_id, [(None, rollout.stage, "rolled_back", reason)], now=now, by=by
            )
            session.commit()
        log.warning("rollout %s rolled back: %s", rollout_id, reason)
        self._publish(line, None)
        return True

    def _advance(self, rollout: Rollout, plan: Plan, decision: Decision, now: datetime) -> None:
        """The running wave holds: complete, wait at a manual gate, or start the next wave."""
        wave = rollout.stage
        if wave >= plan.last:
            self._complete(rollout, decision, now)
            return
        nxt = plan.waves[wave + 1]
        if nxt.manual_gate:
            why = f"{decision.reason}; wave {wave + 2} ({nxt.label}) waits for an approver"
            with self.sessions() as session:
                if self._guarded(
                    session,
                    rollout.id,
                    [rollout.state],
                    at_stage=wave,
                    state="awaiting_gate",
                    reason=why,
                    gates=decision.gates,
                ):
                    self._finish_wave(
                        session, rollout.id, wave, "succeeded", now=now, reason=decision.reason
                    )
                    log_events(session, rollout.id, [(None, wave, "awaiting_gate", why)], now=now)
                    session.commit()
            return
        self._start_wave(
            rollout.id,
            wave + 1,
            by="engine",
            now=now,
            from_states=[rollout.state],
            from_stage=wave,
            reason=f"{decision.reason} -> wave {wave + 2} ({nxt.label})",
        )
        with self.sessions() as session:
            session.execute(
                update(Rollout)
                .where(Rollout.id == rollout.id, Rollout.stage == wave + 1)
                .values(gates=decision.gates)
                .execution_options(synchronize_session=False)
            )
            session.commit()

    def _complete(self, rollout: Rollout, decision: Decision, now: datetime) -> None:
        with self.sessions() as session:
            if not self._guarded(
                session,
                rollout.id,
                ["full"],
                at_stage=rollout.stage,
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
            self._finish_wave(
                session, rollout.id, rollout.stage, "succeeded", now=now, reason=decision.reason
            )
            log_events(
                session, rollout.id, [(None, rollout.stage, "completed", decision.reason)], now=now
            )
            session.commit()
        log.info("rollout %s completed: %s", rollout.id, decision.reason)

    def _pause_on_error(self, rollout: Rollout, decision: Decision, now: datetime) -> None:
        with self.sessions() as session:
            if self._guarded(
                session,
                rollout.id,
                [rollout.state],
                at_stage=rollout.stage,
                paused_state=rollout.state,
                state="paused",
                paused_at=now,
                reason=decision.reason,
                gates=decision.gates,
            ):
                log_events(
                    session, rollout.id, [(None, rollout.stage, "paused", decision.reason)], now=now
                )
                session.commit()
        log.warning("rollout %s paused: %s", rollout.id, decision.reason)

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
        """Evaluate every released rollout once and apply the decisions."""
        now = now or self.clock()
        with self.sessions() as session:
            rollouts = session.scalars(
                select(Rollout).where(Rollout.state.in_(RELEASED_STATES)).order_by(Rollout.id)
            ).all()
        decisions: dict[int, Decision] = {}
        for rollout in rollouts:
            decisions[rollout.id] = self._tick_one(rollout, now)
        return decisions

    def _tick_one(self, rollout: Rollout, now: datetime) -> Decision:
        plan = Plan.from_dict(rollout.plan or {})
        s = self.settings
        with self.sessions() as session:
            count_failures(
                session,
                rollout.id,
                threshold=s.quarantine_failures,
                penalty_s=s.quarantine_s,
                now=now,
            )
            released = sync_members(session, rollout, plan, now=now, release_upto=rollout.stage)
            session.commit()
        self._publish(rollout.model_line, released)
        if rollout.state == "awaiting_gate":
            return Decision(Action.WAIT, rollout.reason or "awaiting an approver")
        with self.sessions() as session:
            snap = build_snapshot(session, rollout, plan, now=now)
        decision = decide(snap, self.bounds, self.retries)
        with self.sessions() as session:
            if decision.timed_out:
                mark_timed_out(
                    session,
                    rollout.id,
                    {d: (snap.devices[d].state, snap.spec.timeout_s) for d in decision.timed_out},
                    now=now,
                )
                count_failures(
                    session,
                    rollout.id,
                    threshold=s.quarantine_failures,
                    penalty_s=s.quarantine_s,
                    now=now,
                )
            retried = retry(
                session, rollout.id, decision.retry, max_retries=self.retries.max_retries, now=now
            )
            if decision.action is Action.WAIT:
                self._guarded(
                    session,
                    rollout.id,
                    [rollout.state],
                    at_stage=rollout.stage,
                    reason=decision.reason,
                    gates=decision.gates,
                )
            session.commit()
        self._publish(rollout.model_line, retried)
        if decision.action is Action.ROLLBACK:
            if self._rollback(
                rollout.id, reason=decision.reason, from_states=(rollout.state,), now=now
            ):
                with self.sessions() as session:
                    session.execute(
                        update(Rollout)
                        .where(Rollout.id == rollout.id)
                        .values(gates=decision.gates)
                        .execution_options(synchronize_session=False)
                    )
                    session.commit()
        elif decision.action is Action.PAUSE:
            self._pause_on_error(rollout, decision, now)
        elif decision.action is Action.ADVANCE:
            self._advance(rollout, plan, decision, now)
        return decision

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def _step(self) -> float:
        self.tick()
        return self.settings.rollout_tick_s


__all__ = ["RolloutEngine", "create_rollout"]
