"""Rollouts: create, inspect, and the operator's approve/pause/resume/abort."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.api.deps import IdPath, ServicesDep, SessionDep
from server.db import Rollout, RolloutDevice
from server.rollout_engine import RolloutEngine
from server.schemas import (
    Name,
    RolloutAction,
    RolloutApprove,
    RolloutCreate,
    RolloutDetail,
    RolloutPublic,
)

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])


def _detail(session: Session, rollout_id: int) -> dict[str, Any]:
    rollout = RolloutEngine.get(session, rollout_id)
    counts: dict[str, dict[str, int]] = {"canary": {}, "rest": {}}
    for stage, state, n in session.execute(
        select(RolloutDevice.stage, RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.stage, RolloutDevice.state)
    ):
        counts["canary" if stage == 0 else "rest"][state] = int(n)
    out = RolloutPublic.model_validate(rollout).model_dump()
    out["devices"] = counts
    return out


@router.post("", response_model=RolloutDetail, status_code=201)
def create(body: RolloutCreate, session: SessionDep, services: ServicesDep) -> Any:
    rollout = services.rollouts.create(
        model_line=body.model_line,
        model_version=body.model_version,
        canary_percent=body.canary_percent,
        created_by=body.created_by,
    )
    return _detail(session, rollout.id)


@router.get("", response_model=list[RolloutPublic])
def list_rollouts(session: SessionDep, model_line: Name | None = None) -> Any:
    stmt = select(Rollout).order_by(Rollout.id.desc())
    if model_line is not None:
        stmt = stmt.where(Rollout.model_line == model_line)
    return session.scalars(stmt).all()


@router.get("/{rollout_id}", response_model=RolloutDetail)
def get_rollout(rollout_id: IdPath, session: SessionDep) -> Any:
    return _detail(session, rollout_id)


@router.post("/{rollout_id}/approve", response_model=RolloutDetail)
def approve(
    rollout_id: IdPath, body: RolloutApprove, session: SessionDep, services: ServicesDep
) -> Any:
    services.rollouts.approve(rollout_id, approver=body.approver)
    return _detail(session, rollout_id)


@router.post("/{rollout_id}/pause", response_model=RolloutDetail)
def pause(
    rollout_id: IdPath,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutAction | None = None,
) -> Any:
    services.rollouts.pause(rollout_id)
    return _detail(session, rollout_id)


@router.post("/{rollout_id}/resume", response_model=RolloutDetail)
def resume(
    rollout_id: IdPath,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutAction | None = None,
) -> Any:
    services.rollouts.resume(rollout_id)
    return _detail(session, rollout_id)


@router.post("/{rollout_id}/abort", response_model=RolloutDetail)
def abort(
    rollout_id: IdPath,
    session: SessionDep,
    services: ServicesDep,
    body: RolloutAction | None = None,
) -> Any:
    action = body or RolloutAction()
    services.rollouts.abort(rollout_id, by=action.by, reason=action.reason)
    return _detail(session, rollout_id)
