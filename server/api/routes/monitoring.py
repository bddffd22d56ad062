"""Monitoring windows of a model line: what each closed window showed, per version and group."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from server.api.deps import SessionDep, ViewerDep
from server.api.schemas import Group, MonitorWindowPublic, Name
from server.db import monitoring, registry

MAX_INT32 = 2**31 - 1

router = APIRouter(tags=["monitoring"])


@router.get(
    "/api/v1/model-lines/{name}/monitoring/windows", response_model=list[MonitorWindowPublic]
)
def list_windows(
    name: Name,
    _op: ViewerDep,
    session: SessionDep,
    version: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
    group: Group | None = None,
    limit: Annotated[int, Query(ge=1, le=monitoring.MAX_LISTED)] = 100,
) -> Any:
    """Evaluated windows, newest first: drift verdict (PSI and Jensen-Shannon per signal with
    their calibrated thresholds), estimated and live accuracy, latency, errors, the rules each
    breached. ``group=*`` is a version's whole fleet."""
    registry.get_model_line(session, name=name)  # 404 for an unknown line
    return monitoring.list_windows(
        session, model_line=name, model_version=version, group=group, limit=limit
    )
