"""Alerts: list with filters, one alert with its figures and webhook deliveries."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from server.api.deps import IdPath, SessionDep, require_viewer
from server.api.schemas import (
    AlertDetail,
    AlertPublic,
    AlertRuleName,
    AlertStateName,
    Group,
    Name,
    WebhookDeliveryPublic,
)
from server.db import monitoring

MAX_INT32 = 2**31 - 1
Limit = Annotated[int, Query(ge=1, le=monitoring.MAX_LISTED)]

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"], dependencies=[Depends(require_viewer)])


@router.get("", response_model=list[AlertPublic])
def list_alerts(
    session: SessionDep,
    model_line: Name | None = None,
    model_version: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
    group: Group | None = None,
    rule: AlertRuleName | None = None,
    state: AlertStateName | None = None,
    limit: Limit = 100,
) -> Any:
    """Alerts, newest first; every filter given must match (``group=*``: a version's whole
    fleet)."""
    return monitoring.list_alerts(
        session,
        model_line=model_line,
        model_version=model_version,
        group=group,
        rule=rule,
        state=state,
        limit=limit,
    )


@router.get("/{alert_id}", response_model=AlertDetail)
def get_alert(alert_id: IdPath, session: SessionDep) -> Any:
    """One alert: the figures of the window that raised it and its webhook deliveries."""
    alert = monitoring.get_alert(session, alert_id=alert_id)
    deliveries = monitoring.deliveries_of(session, alert_id=alert_id)
    return AlertDetail(
        **AlertPublic.model_validate(alert).model_dump(),
        figures=alert.figures or {},
        deliveries=[WebhookDeliveryPublic.model_validate(d) for d in deliveries],
    )
