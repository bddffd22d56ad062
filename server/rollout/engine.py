"""Applies rollout decisions: operator actions, a ticker, and publishing targets.

Every transition is a guarded ``UPDATE rollouts SET ... WHERE id = ? AND state = ? AND stage = ?``:
whoever wins the update performs the side effects, so a restart or a second server instance
never advances or rolls back twice; starting a wave also inserts its ``rollout_waves`` row, whose
primary key refuses a second start outright. The state is committed before targets are
published; at startup every target is announced again (``publish_all_targets``), which covers a
crash between the two.

The guarded update and wave bookkeeping live in ``server.rollout.guard``, the transitions
(start a wave, roll back, advance, complete, pause on error) in ``server.rollout.transitions``;
this module holds the operator actions and the ticker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.core.background import Worker
from server.core.config import Settings
from server.db import audit, registry
from server.db.base import utcnow
from server.db.rollouts import Rollout, RolloutWave
from server.release.signing import Signer, sign_release
from server.release.targeting import targeting_from_request, targeting_of
from server.rollout.decide import Action, Decision, decide
from server.rollout.members import (
    audience,
    count_failures,
    log_events,
    mark_timed_out,
    retry,
    sync_members,
    touch_in_progress,
)
from server.rollout.plan import Plan
from server.rollout.queries import (
    bounds_from,
    build_snapshot,
    create_rollout,
    plan_from_request,
    plan_of,
    retries_from,
)
from server.rollout.states import RUNNING_ROLLOUT_STATES, state_for_wave
from server.rollout.targets import TargetPublisher, targets_for_line
from server.rollout.transitions import RolloutTransitions

log = logging.getLogger(__name__)
RELEASED_STATES = (*RUNNING_ROLLOUT_STATES, "awaiting_gate")


class OperatorAction(StrEnum):
    """What an operator may do to a running rollout besides approving (``RolloutEngine.act``)."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"


class RolloutEngine(RolloutTransitions):
    """Operator actions on rollouts and the periodic ``tick`` that applies ``decide``."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        signer: Signer,
        publisher: TargetPublisher,
        clock: Callable[[], datetime] = utcnow,
        read_sessions: sessionmaker[Session] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.read_sessions = read_sessions or sessions
        self._publish_lock = threading.Lock()
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
        targeting: dict[str, Any] | None = None,
    ) -> Rollout:
        """A rollout in pending_approval, for the devices ``targeting`` admits (None: all).
        Raises InvalidRequestError for a bad plan."""
        plan = plan_from_request(self.settings, canary_percent=canary_percent, waves=waves)
        stored = targeting_from_request(targeting)
        with self.sessions() as session:
            rollout = create_rollout(
                session,
                line=model_line,
                to_version=model_version,
                canary_percent=canary_percent or self.settings.canary_percent,
                created_by=created_by,
                now=self.clock(),
                plan=plan,
                targeting=stored,
            )
            log_events(
                session,
                rollout.id,
                [(None, None, "pending_approval", "created")],
                now=self.clock(),
                by=created_by,
            )
            audit.record(
                session,
                actor=created_by,
                action="rollout.create",
                subject=f"rollout:{rollout.id}",
                details={
                    "line": model_line,
                    "version": model_version,
                    **({"targeting": stored} if stored else {}),
                },
                now=self.clock(),
            )
            session.commit()
            return rollout

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
            devices = audience(session, rollout)  # the wave cut-offs count only the audience
            plan = plan_of(rollout, self.settings).frozen(rollout_id, devices)
            if not self._guarded(
                session,
                rollout_id,
                ["pending_approval"],
                at_stage=0,
                by=approver,
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
                    deployment=plan.waves[0].kind,  # a shadow wave gets a shadow release
                    targeting=targeting_of(rollout.targeting),
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
                by=by,
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
                by=by,
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
                by=by,
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

    def act(
        self, rollout_id: int, action: OperatorAction, *, by: str, reason: str | None
    ) -> Rollout:
        """An operator's pause, resume, abort or rollback (``reason`` is not kept on resume)."""
        if action is OperatorAction.PAUSE:
            return self.pause(rollout_id, by=by, reason=reason)
        if action is OperatorAction.RESUME:
            return self.resume(rollout_id, by=by)
        if action is OperatorAction.ABORT:
            return self.abort(rollout_id, by=by, reason=reason)
        return self.rollback(rollout_id, by=by, reason=reason)

    def publish_all_targets(self) -> int:
        """Re-announce every device's target (at startup: covers a crash between commit and
        publish). Returns the number of messages queued."""
        with self.sessions() as session:
            lines = [ml.name for ml in registry.list_model_lines(session)]
        count = 0
        for line in lines:
            with self.sessions() as session:
                targets = targets_for_line(
                    session,
                    line=line,
                    artifact_base=self.settings.artifact_url_base,
                    roots=self.signer.roots,
                )
            for device_id, message in targets:
                self.publisher.publish(device_id, message)
                count += 1
        return count

    def publish_device_targets(self, line: str, device_ids: list[str]) -> None:
        """Announce these devices' targets now (call after committing a change to them).

        A device that enrolls or registers after a rollout's last tick, or after the rollout
        completed, is in no announcement of the engine's: without this its retained target
        topic stays empty and it never converges on the line's release. A device that a
        running rollout then takes into a started wave is announced again by the next tick.
        """
        self._publish(line, list(device_ids))

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


__all__ = ["OperatorAction", "RolloutEngine", "create_rollout"]
