"""Rollout transitions the engine applies: start a wave, roll back, advance, complete, pause.

Each is a guarded update (``server.rollout.guard``) plus its side effects in the same
transaction (signing, wave rows, member releases, model statuses), committed before the targets
are published. A wave that follows a shadow wave gets a new, higher release that serves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import update

from server.db import audit
from server.db.registry import ModelLine, ModelVersion
from server.db.rollouts import Rollout, RolloutWave
from server.release.signing import sign_release
from server.release.targeting import targeting_of
from server.rollout.decide import Decision
from server.rollout.guard import RolloutGuards
from server.rollout.members import log_events, released_devices, sync_members
from server.rollout.plan import Plan
from server.rollout.states import state_for_wave
from server.rollout.targets import devices_not_sent

# The engine's logger: its records keep the name operators filter on.
log = logging.getLogger("server.rollout.engine")


class RolloutTransitions(RolloutGuards):
    """The engine's state transitions; ``RolloutEngine`` decides when to take them."""

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
                by=by,
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
            after_shadow = plan.waves[from_stage].kind == "shadow" != plan.waves[wave].kind
            if after_shadow:  # the shadow gate held: now a (higher) release that serves
                rollout.release = sign_release(
                    session,
                    signer=self.signer,
                    line_name=rollout.model_line,
                    model_version=rollout.to_version,
                    now=now,
                    ttl_days=self.settings.manifest_ttl_days,
                    targeting=targeting_of(rollout.targeting),
                ).release
                session.flush()
            released = sync_members(session, rollout, plan, now=now, release_upto=wave)
            if after_shadow:
                released = sorted(set(released) | set(released_devices(session, rollout_id)))
            line = rollout.model_line
            session.commit()
        log.info("rollout %s: %s", rollout_id, why)
        self._publish(line, released)
        return True

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
                by=by,
                state="rolled_back",
                paused_state=None,
                finished_at=now,
                reason=reason,
            ):
                return False
            audit.record(
                session,
                actor=by,
                action="rollout.rollback",
                subject=f"rollout:{rollout_id}",
                details={"from": before, "reason": reason},
                now=now,
            )
            rollout = self.get(session, rollout_id)
            line = rollout.model_line
            assert rollout.from_version is not None
            # Not the rollout's targeting: the rollback release becomes the line's current
            # release, the target of every device of the line (members and the rest alike, see
            # server.rollout.targets), so it must admit them all. Members are a subset of the line,
            # so every device that got the rollout gets the old model back; the others are sent
            # the same old model under a higher release. Only the old model's opset is signed.
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
        # The line's current release changed: announce it to every device that did not get it
        # from the rollout (joined after its last tick, never released, held out). Read after
        # the commit, so a device registering meanwhile is either read here or announces
        # itself after this commit (RolloutEngine.publish_device_targets).
        with self.read_sessions() as session:
            others = devices_not_sent(session, line=line, rollout_id=rollout.id)
        self._publish(line, others)

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


__all__ = ["RolloutTransitions"]
