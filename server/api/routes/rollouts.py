"""Rollouts: create with a plan of waves, inspect per wave and per device, and the operator's
approve/pause/resume/abort/rollback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
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
from server.core.errors import ForbiddenError
from server.db import audit
from server.db.rollouts import get_rollout as load_rollout
from server.identity.auth import Operator
from server.rollout import reads
from server.rollout.engine import OperatorAction

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


def _detail(session: Session, rollout_id: int, settings: Settings) -> dict[str, Any]:
    """The rollout's public form, read in a transaction that ends here.

    The write handlers read this after their commit, which on SQLite begins a new transaction
    with the write lock (BEGIN IMMEDIATE). Left open, the lock lasted until the session's
    teardown, which runs in a worker thread after the handler returns; with every worker thread
    taken by sample uploads queued for that lock, the teardown waited for their 30 s writer
    timeout (seen with 50 agents of firmware_sim.procfleet: held 23.8 s after an approval).
    """
    try:
        rollout, extra = reads.rollout_detail(session, rollout_id, settings)
        return {**RolloutPublic.model_validate(rollout).model_dump(), **extra}
    finally:
        session.rollback()


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
    return reads.list_rollouts(session, model_line=model_line)


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
    return reads.list_members(session, rollout_id, wave=wave, state=state)


@router.get("/{rollout_id}/devices/{device_id}")
def device_history(rollout_id: IdPath, device_id: str, session: SessionDep) -> dict[str, Any]:
    """One device in one rollout: its row and its history (server transitions + reports)."""
    return reads.member_history(session, rollout_id, device_id)


@router.get("/{rollout_id}/events")
def events(rollout_id: IdPath, session: SessionDep) -> list[dict[str, Any]]:
    """What the server did to the rollout and its devices, oldest first."""
    return reads.rollout_events(session, rollout_id)


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
    rollout = load_rollout(session, rollout_id=rollout_id)
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


def _operator_action(action: OperatorAction) -> Callable[..., Any]:
    """The handler of ``POST /{rollout_id}/<action>``: the same for every operator action."""

    def handler(
        rollout_id: IdPath,
        operator: OperatorDep,
        session: SessionDep,
        services: ServicesDep,
        body: RolloutAction | None = None,
    ) -> Any:
        request = body or RolloutAction()
        by = acting_as(operator, request.by, "by")
        services.rollouts.act(rollout_id, action, by=by, reason=request.reason)
        return _detail(session, rollout_id, services.settings)

    return handler


# The operator's pause, resume, abort and rollback (one route each, one handler for all).
_DESCRIPTIONS = {
    OperatorAction.ROLLBACK: "Send every device back to the previous model with a new signed "
    "release (also after the\nrollout completed: the champion goes back too).",
}
for _action in OperatorAction:
    router.add_api_route(
        f"/{{rollout_id}}/{_action.value}",
        _operator_action(_action),
        methods=["POST"],
        response_model=RolloutDetail,
        name=_action.value,
        description=_DESCRIPTIONS.get(_action),
    )
