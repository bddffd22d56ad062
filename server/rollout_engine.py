"""Applies rollout decisions: operator actions, a ticker, and publishing targets.

Every transition is a guarded ``UPDATE rollouts SET state = ... WHERE id = ? AND state = ?``:
whoever wins the update performs the side effects, so a restart or a second server instance
never advances or rolls back twice. The state is committed before targets are published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from server import crud
from server.background import Worker
from server.core.config import Settings
from server.db import ModelLine, ModelVersion, Rollout, RolloutDevice, utcnow
from server.errors import ConflictError, NotFoundError
from server.mqtt_bridge import TargetPublisher
from server.rollout import TERMINAL_STATES, Action, Decision, decide, plan_canary
from server.rollout_queries import build_snapshot, create_rollout, thresholds_from
from server.signing import Signer, sign_release
from server.targets import targets_for_line

log = logging.getLogger(__name__)


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
        self._worker = Worker("rollout-engine", self._step)

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
            snap = build_snapshot(session, rollout, stage=stage, now=now)
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

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def _step(self) -> float:
        self.tick()
        return self.settings.rollout_tick_s


__all__ = ["RolloutEngine", "create_rollout", "thresholds_from"]
