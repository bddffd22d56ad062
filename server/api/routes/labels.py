"""The labelling queue (unlabelled samples; Label Studio export and import, a summary for the
dashboard), the capture policies issued to drifting device groups, and a device's report of a
policy it refused."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from contract.messages import clean_text
from server.api.deps import DeviceDep, OperatorDep, ServicesDep, SessionDep, ViewerDep
from server.api.routes.samples import _read_capped
from server.core.errors import InvalidRequestError
from server.db import fleet, reports
from server.identity.auth import require_same_device
from server.intake import label_studio, labelling
from server.intake.samples import count_labelled
from server.monitoring.capture import list_policies, raised_in_force

router = APIRouter(prefix="/api/v1", tags=["labels"])

Limit = Annotated[int, Query(ge=1, le=labelling.MAX_EXPORT_TASKS)]
Offset = Annotated[int, Query(ge=0, le=10**9)]
MAX_REFUSAL_CHARS = 1000


@router.get("/model-lines/{line}/labelling-queue")
def get_queue(
    line: str, _op: ViewerDep, session: SessionDep, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    """Samples of the line waiting for a label, oldest first (no input bytes)."""
    rows = labelling.queued(session, line=line, limit=limit, offset=offset)
    return {
        "model_line": line,
        "queued": labelling.queue_size(session, line=line),
        "samples": [
            {
                "sample_id": r.sample_id,
                "device_id": r.device_id,
                "model_version": r.model_version,
                "predicted_label": r.predicted_label,
                "confidence": r.confidence,
                "captured_at": r.captured_at,
                "received_at": r.received_at,
            }
            for r in rows
        ],
    }


@router.get("/model-lines/{line}/labelling-summary")
def get_labelling_summary(
    line: str, _op: ViewerDep, session: SessionDep, services: ServicesDep
) -> dict[str, Any]:
    """What labelling stands at on the line: samples waiting for a label, labelled samples by
    the label's source (quarantined ones left out of both), and the raised capture policy in
    force per device group, with its expiry."""
    labelling.line_labels(session, line=line)  # 404 for an unknown line
    return {
        "model_line": line,
        "queued": labelling.queue_size(session, line=line),
        "labelled": labelling.labelled_by_source(session, line=line),
        "capture_policies": raised_in_force(session, line=line, now=services.clock()),
    }


@router.get("/model-lines/{line}/labelling-queue/export")
def export_queue(
    line: str,
    _op: ViewerDep,
    session: SessionDep,
    format: Literal["label-studio"] = "label-studio",  # noqa: A002 - the query parameter's name
    limit: Limit = 1000,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    """The queue as Label Studio tasks (import them into a project whose labelling config is
    ``.../labelling-queue/label-config``); label there, export JSON, then import it here."""
    labels, spec = labelling.line_labels(session, line=line)
    rows = labelling.queued(session, line=line, limit=limit, offset=offset)
    return label_studio.label_studio_tasks(rows, labels=labels, spec=spec)


@router.get("/model-lines/{line}/labelling-queue/label-config", response_class=PlainTextResponse)
def label_config(line: str, _op: ViewerDep, session: SessionDep) -> str:
    """The Label Studio labelling config (XML) the exported tasks fit."""
    labels, _ = labelling.line_labels(session, line=line)
    return label_studio.label_config(labels)


@router.post("/labels/import")
async def import_labels(
    request: Request,
    op: OperatorDep,
    services: ServicesDep,
    format: Literal["label-studio"] = "label-studio",  # noqa: A002
) -> dict[str, Any]:
    """Fill queued samples from Label Studio's JSON export (all or nothing; idempotent). A
    malformed file is a 422 naming the task, and nothing is changed."""
    raw = await _read_capped(request, services.settings.labels_max_import_bytes)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequestError(f"import file is not JSON: {str(exc)[:200]}") from exc
    parsed, skipped = label_studio.parse_label_studio(data)

    def work() -> labelling.ImportResult:
        with services.sessions() as session:
            return labelling.import_labels(
                session,
                labels=parsed,
                skipped=skipped,
                actor=op.name,
                now=services.clock(),
                count=count_labelled(services.settings.retrain_cooldown_s),
            )

    result = await run_in_threadpool(work)
    if result.jobs_triggered:
        services.jobs.wake()
    return {
        "tasks": result.tasks,
        "skipped": result.skipped,
        "labelled": len(result.labelled),
        "unchanged": result.unchanged,
        "conflicts": result.conflicts,
        "jobs_triggered": result.jobs_triggered,
        "labelled_by": op.name,
    }


@router.get("/model-lines/{line}/capture-policies")
def get_capture_policies(
    line: str, _op: ViewerDep, session: SessionDep, limit: Limit = 50
) -> list[dict[str, Any]]:
    """The capture policies issued for the line's groups, newest first (``current``: in force)."""
    return list_policies(session, line=line, limit=limit)


class PolicyRefusal(BaseModel):
    group: str = Field(max_length=200)
    reason: str = Field(max_length=MAX_REFUSAL_CHARS)


@router.post("/devices/{device_id}/capture-policy/refusals", status_code=202)
def post_policy_refusal(
    device_id: str,
    body: PolicyRefusal,
    device: DeviceDep,
    session: SessionDep,
    services: ServicesDep,
) -> dict[str, Any]:
    """A device refused a capture policy (forged, expired, oversized, replayed...): kept with
    its refused reports (``GET /devices/{id}/refused``, kind ``capture_policy``)."""
    require_same_device(device, device_id)
    fleet.get_device(session, device_id=device_id)
    reports.record_refused(
        session,
        device_id=device_id,
        kind="capture_policy",
        reason=clean_text(body.reason),
        excerpt=clean_text(f"group {body.group}", 300),
        now=services.clock(),
    )
    session.commit()
    return {"stored": True}
