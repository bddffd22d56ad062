"""Identity endpoints: who am I, operator tokens (admin), bootstrap tokens, enrollment, revoke.

Rights: tokens are created by an admin; bootstrap tokens by an operator or above; enrollment
itself is authenticated by the bootstrap token in the body (the device has nothing else yet);
revoking a device needs the operator role. Every secret is returned once, at creation.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from server.api.deps import (
    AdminDep,
    IdPath,
    OperatorDep,
    ServicesDep,
    SessionDep,
    ViewerDep,
    read_sessions,
)
from server.api.schemas import (
    DeviceEnroll,
    DeviceEnrolled,
    DevicePublic,
    EnrollmentTokenCreate,
    EnrollmentTokenIssued,
    OperatorMe,
    OperatorTokenCreate,
    OperatorTokenIssued,
    OperatorTokenPublic,
)
from server.identity import enrollment
from server.identity.broker_acl import sync_broker

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["auth"])


@router.get("/auth/me", response_model=OperatorMe)
def me(operator: ViewerDep) -> Any:
    """The operator the bearer token belongs to (the dashboard shows it and enables buttons)."""
    return {"name": operator.name, "role": operator.role}


@router.post("/operators/tokens", response_model=OperatorTokenIssued, status_code=201)
def create_operator_token(
    body: OperatorTokenCreate, admin: AdminDep, session: SessionDep, services: ServicesDep
) -> Any:
    issued = enrollment.create_operator_token(
        session, name=body.name, role=body.role, by=admin, now=services.clock()
    )
    session.commit()
    row = next(t for t in enrollment.list_operator_tokens(session) if t.id == issued.id)
    return {**OperatorTokenPublic.model_validate(row).model_dump(), "token": issued.token}


@router.get("/operators/tokens", response_model=list[OperatorTokenPublic])
def list_operator_tokens(_admin: AdminDep, session: SessionDep) -> Any:
    return enrollment.list_operator_tokens(session)


@router.post("/operators/tokens/{token_id}/revoke", response_model=OperatorTokenPublic)
def revoke_operator_token(
    token_id: IdPath, admin: AdminDep, session: SessionDep, services: ServicesDep
) -> Any:
    enrollment.revoke_operator_token(session, token_id=token_id, by=admin, now=services.clock())
    session.commit()
    return next(t for t in enrollment.list_operator_tokens(session) if t.id == token_id)


@router.post("/enrollment-tokens", response_model=EnrollmentTokenIssued, status_code=201)
def create_enrollment_token(
    body: EnrollmentTokenCreate, operator: OperatorDep, session: SessionDep, services: ServicesDep
) -> Any:
    """A bootstrap token for ``max_uses`` devices (a fleet image can carry a multi-use one)."""
    issued, row = enrollment.create_enrollment_token(
        session,
        max_uses=body.max_uses,
        ttl_s=body.ttl_s or services.settings.enrollment_token_ttl_s,
        model_line=body.model_line,
        groups=list(body.groups),
        by=operator,
        now=services.clock(),
    )
    session.commit()
    return {
        "id": issued.id,
        "token": issued.token,
        "max_uses": row.max_uses,
        "expires_at": row.expires_at,
        "model_line": row.model_line,
        "groups": row.groups,
    }


@router.post("/devices/enroll", response_model=DeviceEnrolled, status_code=201)
def enroll(body: DeviceEnroll, session: SessionDep, services: ServicesDep) -> Any:
    """Exchange a bootstrap token for this device's credential (returned once). A retry of
    the same enrollment (same token and ``enroll_secret``) after a lost reply gets a new one."""
    done = enrollment.enroll_device(
        session,
        token=body.bootstrap_token,
        device_id=body.device_id,
        model_line=body.model_line,
        hardware=body.hardware,
        groups=list(body.groups),
        agent_version=body.agent_version,
        now=services.clock(),
        enroll_secret=body.enroll_secret,
    )
    session.commit()
    device_id, line = done.device.device_id, done.device.model_line
    # Committed: from here on nothing may fail the request, or the device loses the credential
    # (a retry is refused: "already enrolled"). A broker rewrite that fails is logged; the next
    # enrollment, revocation or server start writes the files again.
    try:
        sync_broker(read_sessions(services), services.settings)
    except Exception:
        log.exception("broker files not rewritten after enrolling %s", device_id)
    services.rollouts.publish_device_targets(line, [device_id])
    return {
        "device_id": device_id,
        "credential": done.credential,
        "device": DevicePublic.model_validate(done.device),
    }


@router.post("/devices/{device_id}/revoke", response_model=DevicePublic)
def revoke(
    device_id: str, operator: OperatorDep, session: SessionDep, services: ServicesDep
) -> Any:
    """Refuse the device everywhere: HTTP 403 from now on, and out of the broker's files."""
    device = enrollment.revoke_device(
        session, device_id=device_id, by=operator, now=services.clock()
    )
    session.commit()
    services.revoked_devices.add(device_id)
    sync_broker(read_sessions(services), services.settings)
    return device
