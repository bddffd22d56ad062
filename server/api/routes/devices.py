"""Devices: registration, listing, their current target, HTTP fallback for status/metrics.

Device routes (register, target, status, metrics) take the device's own credential (DeviceDep)
and refuse to act for another device id (403); listing and reading devices is for operators
(viewer and up). Enrollment and revocation live in ``server.api.routes.auth``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from server.api.deps import DeviceDep, ServicesDep, SessionDep, ViewerDep
from server.api.schemas import (
    DeviceEventPublic,
    DevicePublic,
    DeviceRegister,
    Name,
    RefusedReportPublic,
)
from server.core.errors import InvalidRequestError
from server.db import fleet, reports
from server.db.fleet import Device
from server.db.identity import DeviceCredential
from server.fleet.ingest_parse import Accepted, classify
from server.identity.auth import require_same_device
from server.identity.enrollment import check_allowed
from server.rollout.targets import resolve_target

Limit = Annotated[int, Query(ge=1, le=reports.MAX_LISTED)]

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.post("/register", response_model=DevicePublic)
def register(
    body: DeviceRegister, device: DeviceDep, session: SessionDep, services: ServicesDep
) -> Any:
    """An enrolled device refreshes its record (agent version, hardware) at every start; it may
    not widen the model line or groups its enrollment granted. A new or changed device gets its
    target announced at once (it may join after a rollout's last tick)."""
    require_same_device(device, body.device_id)
    cred = session.get(DeviceCredential, device.device_id)
    check_allowed(
        device_id=device.device_id,
        model_line=body.model_line,
        groups=list(body.groups),
        line=cred.allowed_line if cred else None,
        allowed=list(cred.allowed_groups or []) if cred else [],
    )
    before = session.get(Device, device.device_id)
    facts = (before.model_line, before.hardware, list(before.groups or ())) if before else None
    registered = fleet.register_device(
        session,
        device_id=body.device_id,
        model_line=body.model_line,
        hardware=body.hardware,
        groups=body.groups,
        agent_version=body.agent_version,
        now=services.clock(),
    )
    if facts != (registered.model_line, registered.hardware, list(registered.groups or ())):
        # New, or its line, hardware or groups changed (what its target depends on): announce
        # its target now; an unchanged device's retained target is already on the broker.
        services.rollouts.publish_device_targets(registered.model_line, [registered.device_id])
    return registered


@router.get("", response_model=list[DevicePublic])
def list_devices(_op: ViewerDep, session: SessionDep, model_line: Name | None = None) -> Any:
    return fleet.list_devices(session, model_line=model_line)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, _op: ViewerDep, session: SessionDep) -> Any:
    return fleet.get_device(session, device_id=device_id)


@router.get("/{device_id}/target")
def get_target(
    device_id: str, device: DeviceDep, session: SessionDep, services: ServicesDep
) -> dict[str, Any]:
    """What this device should run now (contract.TargetMessage)."""
    require_same_device(device, device_id)
    return resolve_target(
        session,
        device_id=device_id,
        artifact_base=services.settings.artifact_url_base,
        roots=services.signer.roots,
    ).to_dict()


@router.get("/{device_id}/events", response_model=list[DeviceEventPublic])
def device_events(device_id: str, _op: ViewerDep, session: SessionDep, limit: Limit = 50) -> Any:
    """The device's stored status reports, newest first; ``dropped`` names each field the server
    left out of one (out of range, wrong type)."""
    fleet.get_device(session, device_id=device_id)
    return reports.list_events(session, device_id=device_id, limit=limit)


@router.get("/{device_id}/refused", response_model=list[RefusedReportPublic])
def refused_reports(device_id: str, _op: ViewerDep, session: SessionDep, limit: Limit = 50) -> Any:
    """Reports from the device's topics the server could not use, newest first, with the reason
    and an excerpt (the newest ``reports.MAX_REFUSED_PER_DEVICE`` are kept)."""
    fleet.get_device(session, device_id=device_id)
    return reports.list_refused(session, device_id=device_id, limit=limit)


def _parse(kind: str, device_id: str, body: Any, now_ts: float) -> Accepted:
    """Read the body as the MQTT ingest does: fields out of range are dropped (and listed in
    the response); a report the server cannot use at all is a 422 for the device to see."""
    result = classify(kind, device_id, body, received_ts=now_ts)
    if not isinstance(result, Accepted):
        raise InvalidRequestError(result.reason)
    return result


@router.post("/{device_id}/status", status_code=202)
def post_status(
    device_id: str,
    device: DeviceDep,
    session: SessionDep,
    services: ServicesDep,
    body: Annotated[Any, Body()],
) -> dict[str, Any]:
    """HTTP fallback for devices that cannot reach the broker; same path as MQTT."""
    require_same_device(device, device_id)
    report = _parse("status", device_id, body, services.clock().timestamp())
    fleet.get_device(session, device_id=device_id)
    services.ingest.submit("status", report)
    return {"queued": True, "dropped": list(report.dropped)}


@router.post("/{device_id}/metrics", status_code=202)
def post_metrics(
    device_id: str,
    device: DeviceDep,
    session: SessionDep,
    services: ServicesDep,
    body: Annotated[Any, Body()],
) -> dict[str, Any]:
    require_same_device(device, device_id)
    report = _parse("metrics", device_id, body, services.clock().timestamp())
    fleet.get_device(session, device_id=device_id)
    services.ingest.submit("metrics", report)
    return {"queued": True, "dropped": list(report.dropped)}
