"""Rollouts: create with a plan of waves, inspect per wave and per device, and the operator's
approve/pause/resume/abort/rollback."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from server.api.deps import (
    ApproverDep,
    IdPath,
    OperatorDep,
    ServicesDep,
    SessionDep,
    require_viewer,
)
from server.api.schemas import (
    Name,
    RolloutAction,
    RolloutApprove,
    RolloutCreate,
    RolloutDetail,
    RolloutPublic,
)
from server.core.config import Settings
from server.core.errors import ForbiddenError, NotFoundError
from server.db import audit
from server.db.fleet import DeviceEvent
from server.db.rollouts import Rollout, RolloutDevice, RolloutEvent, RolloutWave
from server.identity.auth import Operator
from server.rollout.decide import wave_counts
from server.rollout.engine import RolloutEngine
from server.rollout.queries import plan_of

# Reads need a viewer token; create/pause/resume/abort/rollback the operator role; approve the
# approver role (and, with Settings.four_eyes, someone other than the rollout's creator). Rollback
# is a safety action, so an operator may take it without an approver.
router = APIRouter(
    prefix="/api/v1/rollouts", tags=["rollouts"], dependencies=[Depends(require_viewer)]
)


def acting_as(operator: Operator, claimed: str | None, field: str) -> str:
    """The name recorded for an action: the authenticated operator's (a different claim: 403)."""
    if claimed is not None and claimed != operator.name:
        raise ForbiddenError(
            f"{field} {claimed!r} is not the authenticated operator {operator.name!r}"
        )
    return operator.name


def _wave_state(rollout: Rollout, wave: int, row: RolloutWave | None) -> str:
    if row is None:
        if rollout.state == "awaiting_gate" and wave == rollout.stage + 1:
            return "awaiting_approval"
        return "pending"
    if row.finished_at is not None:
        return row.outcome or "done"
    return "paused" if rollout.state == "paused" else "running"


def _detail(session: Session, rollout_id: int, settings: Settings) -> dict[str, Any]:
    rollout = RolloutEngine.get(session, rollout_id)
    rows = session.execute(
        select(RolloutDevice.stage, RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.stage, RolloutDevice.state)
    ).all()
    per_wave = wave_counts([(w, s) for w, s, n in rows for _ in range(int(n))])
    counts: dict[str, dict[str, int]] = {"canary": {}, "rest": {}}
    for wave, states in per_wave.items():
        key = "canary" if wave == 0 else "rest"
        for state, n in states.items():
            counts[key][state] = counts[key].get(state, 0) + n
    plan = plan_of(rollout, settings)
    started = {
        w.wave: w
        for w in session.scalars(
            select(RolloutWave).where(RolloutWave.rollout_id == rollout_id)
        ).all()
    }
    waves = []
    for i, spec in enumerate(plan.waves):
        row = started.get(i)
        waves.append(
            {
                "index": i,
                "label": spec.label,
                "spec": spec.to_dict(),
                "state": _wave_state(rollout, i, row),
                "devices": per_wave.get(i, {}),
                "started_at": row.started_at if row else None,
                "started_by": row.started_by if row else None,
                "finished_at": row.finished_at if row else None,
                "reason": row.reason if row else None,
            }
        )
    out = RolloutPublic.model_validate(rollout).model_dump()
    out["devices"] = counts
    out["waves"] = waves
    return out


@router.post("", response_model=RolloutDetail, status_code=201)
def create(
    body: RolloutCreate, operator: OperatorDep, session: SessionDep, services: ServicesDep
) -> Any:
    rollout = services.rollouts.create(
        model_line=body.model_line,
        model_version=body.model_version,
        canary_percent=body.canary_percent,
        waves=[w.model_dump() for w in body.waves] if body.waves is not None else None,
        targeting=body.targeting.model_dump() if body.targeting is not None else None,
        created_by=acting_as(operator, body.created_by, "created_by"),
    )
    return _detail(session, rollout.id, services.settings)


@router.get("", response_model=list[RolloutPublic])
def list_rollouts(session: SessionDep, model_line: Name | None = None) -> Any:
    stmt = select(Rollout).order_by(Rollout.id.desc())
    if model_line is not None:
        stmt = stmt.where(Rollout.model_line == model_line)
    return session.scalars(stmt).all()


@router.get("/{rollout_id}", response_model=RolloutDetail)
def get_rollout(rollout_id: IdPath, session: SessionDep, services: ServicesDep) -> Any:
    return _detail(session, rollout_id, services.settings)


@router.get("/{rollout_id}/devices")
def list_devices(
    rollout_id: IdPath,
    session: SessionDep,
    wave: Annotated[int | None, Query(ge=1, le=1000)] = None,
    state: Name | None = None,
) -> list[dict[str, Any]]:
    """Every device of the rollout: wave (1-based), state, reason, timestamps, attempts."""
    RolloutEngine.get(session, rollout_id)
    rd = RolloutDevice
    stmt = select(rd).where(rd.rollout_id == rollout_id).order_by(rd.stage, rd.device_id)
    if wave is not None:
        stmt = stmt.where(rd.stage == wave - 1)
    if state is not None:
        stmt = stmt.where(rd.state == state)
    return [_device_row(r) for r in session.scalars(stmt).all()]


def _device_row(r: RolloutDevice) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "wave": r.stage + 1,
        "state": r.state,
        "reason": r.reason,
        "updated_at": r.updated_at,
        "notified_at": r.notified_at,
        "installed_at": r.installed_at,
        "attempts": r.attempts,
        "failures": r.failures,
    }


@router.get("/{rollout_id}/devices/{device_id}")
def device_history(rollout_id: IdPath, device_id: str, session: SessionDep) -> dict[str, Any]:
    """One device in one rollout: its row and its history (server transitions + reports)."""
    if not 1 <= len(device_id) <= 128:
        raise NotFoundError(f"device {device_id[:128]!r} is not in rollout {rollout_id}")
    rollout = RolloutEngine.get(session, rollout_id)
    row = session.get(RolloutDevice, (rollout_id, device_id))
    if row is None:
        raise NotFoundError(f"device {device_id!r} is not in rollout {rollout_id}")
    history: list[dict[str, Any]] = [
        {"at": e.at, "source": "server", "state": e.state, "reason": e.reason, "by": e.by}
        for e in session.scalars(
            select(RolloutEvent).where(
                RolloutEvent.rollout_id == rollout_id, RolloutEvent.device_id == device_id
            )
        ).all()
    ]
    releases = [r for r in (rollout.release,) if r is not None]
    history += [
        {
            "at": e.received_at,
            "source": "device",
            "state": e.state,
            "reason": e.reason,
            "model_version": e.model_version,
            "target_release": e.target_release,
        }
        for e in session.scalars(
            select(DeviceEvent).where(
                DeviceEvent.device_id == device_id,
                or_(
                    DeviceEvent.rollout_id == rollout_id,
                    DeviceEvent.target_release.in_(releases or [-1]),
                ),
            )
        ).all()
    ]
    history.sort(key=lambda h: h["at"])
    return {**_device_row(row), "history": history}


@router.get("/{rollout_id}/events")
def events(rollout_id: IdPath, session: SessionDep) -> list[dict[str, Any]]:
    """What the server did to the rollout and its devices, oldest first."""
    RolloutEngine.get(session, rollout_id)
    return [
        {
            "at": e.at,
            "device_id": e.device_id,
            "wave": None if e.wave is None else e.wave + 1,
            "state": e.state,
            "reason": e.reason,
            "by": e.by,
        }
        for e in session.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == rollout_id)
            .order_by(RolloutEvent.id)
        ).all()
    ]


@router.post("/{rollout_id}/approve", response_model=RolloutDetail)
def approve(
    rollout_id: IdPath,
    operator: ApproverDep,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutApprove | None = None,
) -> Any:
    """Start the first wave, or the next wave waiting at a manual gate (approver role)."""
    name = acting_as(operator, body.approver if body else None, "approver")
    rollout = RolloutEngine.get(session, rollout_id)
    if services.settings.four_eyes and rollout.created_by == name:
        raise ForbiddenError(
            f"four-eyes rule: {name} created rollout {rollout_id} and cannot approve it"
        )
    session.rollback()  # end the read transaction before the engine writes
    services.rollouts.approve(rollout_id, approver=name)
    audit.record(
        session,
        actor=name,
        action="rollout.approve",
        subject=f"rollout:{rollout_id}",
        details={"role": operator.role.value},
        now=services.clock(),
    )
    session.commit()
    return _detail(session, rollout_id, services.settings)


@router.post("/{rollout_id}/pause", response_model=RolloutDetail)
def pause(
    rollout_id: IdPath,
    operator: OperatorDep,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutAction | None = None,
) -> Any:
    action = body or RolloutAction()
    by = acting_as(operator, action.by, "by")
    services.rollouts.pause(rollout_id, by=by, reason=action.reason)
    return _detail(session, rollout_id, services.settings)


@router.post("/{rollout_id}/resume", response_model=RolloutDetail)
def resume(
    rollout_id: IdPath,
    operator: OperatorDep,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutAction | None = None,
) -> Any:
    action = body or RolloutAction()
    services.rollouts.resume(rollout_id, by=acting_as(operator, action.by, "by"))
    return _detail(session, rollout_id, services.settings)


@router.post("/{rollout_id}/abort", response_model=RolloutDetail)
def abort(
    rollout_id: IdPath,
    operator: OperatorDep,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutAction | None = None,
) -> Any:
    action = body or RolloutAction()
    by = acting_as(operator, action.by, "by")
    services.rollouts.abort(rollout_id, by=by, reason=action.reason)
    return _detail(session, rollout_id, services.settings)


@router.post("/{rollout_id}/rollback", response_model=RolloutDetail)
def rollback(
    rollout_id: IdPath,
    operator: OperatorDep,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutAction | None = None,
) -> Any:
    """Send every device back to the previous model with a new signed release (also after the
    rollout completed: the champion goes back too)."""
    action = body or RolloutAction()
    by = acting_as(operator, action.by, "by")
    services.rollouts.rollback(rollout_id, by=by, reason=action.reason)
    return _detail(session, rollout_id, services.settings)
