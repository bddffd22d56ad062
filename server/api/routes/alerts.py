"""Alerts: list with filters, one alert with its figures and webhook deliveries, acknowledge."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from server.api.deps import IdPath, OperatorDep, ServicesDep, SessionDep, require_viewer
from server.api.schemas import (
    AlertAcknowledge,
    AlertDetail,
    AlertPublic,
    AlertRuleName,
    AlertStateName,
    Group,
    Name,
    WebhookDeliveryPublic,
)
from server.db import monitoring
from server.monitoring.acknowledge import acknowledge

MAX_INT32 = 2**31 - 1
Limit = Annotated[int, Query(ge=1, le=monitoring.MAX_LISTED)]

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"], dependencies=[Depends(require_viewer)])


def _public(alert: monitoring.Alert, ack: monitoring.AlertAcknowledgement | None) -> AlertPublic:
    out = AlertPublic.model_validate(alert)
    if ack is not None:
        out.acknowledged_by = ack.acknowledged_by
        out.acknowledged_at = ack.acknowledged_at
        out.ack_note = ack.note
    return out


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
    """Alerts, newest first, each with its acknowledgement if any; every filter given must
    match (``group=*``: a version's whole fleet)."""
    alerts = monitoring.list_alerts(
        session,
        model_line=model_line,
        model_version=model_version,
        group=group,
        rule=rule,
        state=state,
        limit=limit,
    )
    acks = monitoring.acknowledgements_of(session, alert_ids=[a.id for a in alerts])
    return [_public(a, acks.get(a.id)) for a in alerts]


@router.get("/{alert_id}", response_model=AlertDetail)
def get_alert(alert_id: IdPath, session: SessionDep) -> Any:
    """One alert: the figures of the window that raised it, its acknowledgement and its
    webhook deliveries."""
    alert = monitoring.get_alert(session, alert_id=alert_id)
    ack = monitoring.acknowledgements_of(session, alert_ids=[alert_id]).get(alert_id)
    deliveries = monitoring.deliveries_of(session, alert_id=alert_id)
    return AlertDetail(
        **_public(alert, ack).model_dump(),
        figures=alert.figures or {},
        deliveries=[WebhookDeliveryPublic.model_validate(d) for d in deliveries],
    )


@router.post("/{alert_id}/acknowledge", response_model=AlertPublic)
def post_acknowledge(
    alert_id: IdPath,
    operator: OperatorDep,
    session: SessionDep,
    services: ServicesDep,
    body: AlertAcknowledge | None = None,
) -> Any:
    """Acknowledge a raised alert (operator role or above; audited; webhook event
    ``alert.acknowledged``). The alert stays raised and its training goes on. 404: unknown
    alert; 409: cleared, or already acknowledged."""
    settings = services.settings
    alert, ack = acknowledge(
        session,
        alert_id=alert_id,
        actor=operator.name,
        note=body.note if body else None,
        now=services.clock(),
        webhook=bool(settings.alert_webhook_url),
        public_url=settings.public_url,
    )
    if settings.alert_webhook_url:
        services.webhook.wake()
    return _public(alert, ack)
