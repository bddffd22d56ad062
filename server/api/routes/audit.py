"""Audit log (read-only: there is no API to change it) and the screening quarantine."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from server.api.deps import OperatorDep, ServicesDep, SessionDep, ViewerDep
from server.db import audit
from server.intake.screening import list_quarantine, release_sample

router = APIRouter(tags=["audit"])

MAX_INT63 = 2**63 - 1
SampleIdPath = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("/api/v1/audit")
def get_audit(
    _op: ViewerDep,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_INT63, description="Records after this seq.")] = 0,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_PAGE)] = 100,
    action: Annotated[str | None, Query(max_length=64)] = None,
    subject: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """A page of audit records, oldest first; ``next_after`` continues the listing."""
    entries = audit.list_entries(
        session, after_seq=after, limit=limit, action=action, subject=subject
    )
    return {
        "records": [e.public() for e in entries],
        "next_after": entries[-1].seq if entries else after,
    }


@router.get("/api/v1/audit/verify")
def get_audit_verify(
    _op: ViewerDep,
    session: SessionDep,
    expect_head: Annotated[str | None, Query(min_length=64, max_length=64)] = None,
) -> dict[str, Any]:
    """Recompute the whole chain: ``ok``, the head hash, or the first bad record."""
    return audit.verify(session, expect_head=expect_head).public()


@router.get("/api/v1/samples/quarantine")
def get_quarantine(
    _op: ViewerDep,
    session: SessionDep,
    model_line: Annotated[str, Query(min_length=1, max_length=64)],
    include_released: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Samples screening held back from dataset versions: reason, device, time."""
    return list_quarantine(session, line=model_line, include_released=include_released, limit=limit)


@router.post("/api/v1/samples/{sample_id}/release")
def post_release(
    sample_id: SampleIdPath, op: OperatorDep, session: SessionDep, services: ServicesDep
) -> dict[str, Any]:
    """Let a quarantined sample into the next dataset version (audited)."""
    release_sample(session, sample_id=sample_id, actor=op.name, now=services.clock())
    return {"sample_id": sample_id, "released_by": op.name}
