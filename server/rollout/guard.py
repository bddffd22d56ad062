"""The guarded writes every rollout transition goes through, shared by the engine's modules.

``_guarded`` is the one ``UPDATE rollouts SET ... WHERE id = ? AND state IN (...) [AND stage = ?]``
(with its ``rollout.state`` audit record): whoever wins it performs the side effects, so two
engines or a restarted one never apply a transition twice. ``_publish`` announces targets after
the commit. The attributes are set by ``server.rollout.engine.RolloutEngine``.

Publishing is serialised (``_publish_lock``): each announcement reads the targets and hands them
to the publisher under the lock, so a later announcement read a newer state than an earlier one,
and the publisher's "latest wins" keeps the newest target of a device whatever thread (the
ticker, an operator action, a device registering) announced it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.core.config import Settings
from server.core.errors import ConflictError, NotFoundError
from server.db import audit
from server.db.rollouts import Rollout, RolloutWave, get_rollout
from server.release.signing import Signer
from server.rollout.targets import TargetPublisher, targets_for_line


class RolloutGuards:
    """Guarded state updates, wave bookkeeping and target publishing of the rollout engine."""

    settings: Settings
    sessions: sessionmaker[Session]
    signer: Signer
    publisher: TargetPublisher
    clock: Callable[[], datetime]
    read_sessions: sessionmaker[Session]  # targets are only read: no writer's turn on SQLite
    _publish_lock: threading.Lock

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
        by: str = "engine",
        **values: Any,
    ) -> bool:
        """``UPDATE rollouts SET values WHERE id AND state IN states [AND stage = at_stage]``;
        a change is appended to the audit log (``rollout.state``, actor ``by``) in the same
        transaction."""
        audit.lock(session)  # before the rollout's row lock (see server.db.audit: lock order)
        before = session.scalar(select(Rollout.state).where(Rollout.id == rollout_id))
        stmt = update(Rollout).where(Rollout.id == rollout_id, Rollout.state.in_(states))
        if at_stage is not None:
            stmt = stmt.where(Rollout.stage == at_stage)
        row = session.execute(
            stmt.values(**values)
            .returning(Rollout.state, Rollout.stage)
            .execution_options(synchronize_session=False)
        ).first()
        if row is None:
            return False
        audit.record(
            session,
            actor=by,
            action="rollout.state",
            subject=f"rollout:{rollout_id}",
            details={
                "from": before if before in states else states[0],
                "to": row.state,
                "stage": row.stage,
                "reason": values.get("reason"),
            },
            now=self.clock(),
        )
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

    @staticmethod
    def get(session: Session, rollout_id: int) -> Rollout:
        return get_rollout(session, rollout_id=rollout_id)

    def _publish(self, line: str, device_ids: list[str] | None) -> None:
        if device_ids is not None and not device_ids:
            return
        with self._publish_lock:
            with self.read_sessions() as session:
                targets = targets_for_line(
                    session,
                    line=line,
                    artifact_base=self.settings.artifact_url_base,
                    device_ids=device_ids,
                    roots=self.signer.roots,
                )
            for device_id, message in targets:
                self.publisher.publish(device_id, message)


__all__ = ["RolloutGuards"]
