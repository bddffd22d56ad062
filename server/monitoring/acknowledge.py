"""Acknowledging an alert: an operator says "seen, I am on it" (Alertmanager's and PagerDuty's ack).

:func:`acknowledge` is the one writer of ``alert_acknowledgements``. An acknowledgement records
who, when and an optional note, is audited (``alert.acknowledge``) and, with a webhook URL
configured, queues an ``alert.acknowledged`` delivery in the outbox, all in one transaction.
It changes nothing else: the alert stays raised until its own clean windows clear it, its
hysteresis state and the training it queued are the evaluator's and the retraining's as before.

Only a raised alert can be acknowledged, once. An alert that clears and is raised again is a new
alert (a new row, see ``server.monitoring.alerts``), so it needs a new acknowledgement.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.core.errors import ConflictError, InvalidRequestError, NotFoundError
from server.db import audit
from server.db.monitoring import ALERT_RAISED, Alert, AlertAcknowledgement
from server.monitoring.alerts import queue_webhook

EVENT = "alert.acknowledged"  # the webhook event (X-Edgeloop-Event)
MAX_NOTE_CHARS = 1000  # characters of an operator's note


def acknowledge(
    session: Session,
    *,
    alert_id: int,
    actor: str,
    note: str | None,
    now: datetime,
    webhook: bool,
    public_url: str = "",
) -> tuple[Alert, AlertAcknowledgement]:
    """Acknowledge a raised alert; commits.

    Args:
        actor: the operator's name (from the bearer token, never from the request body).
        note: what the operator says about it (at most :data:`MAX_NOTE_CHARS`), or None.
        webhook: a webhook URL is configured: queue the ``alert.acknowledged`` delivery.
        public_url: the server's public URL, for the link in the webhook's payload.

    Returns:
        (the alert, its acknowledgement).

    Raises:
        InvalidRequestError: the note is too long.
        NotFoundError: no such alert.
        ConflictError: the alert has cleared, or was already acknowledged (the message says
            by whom and when).
    """
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidRequestError(f"a note is at most {MAX_NOTE_CHARS} characters")
    # Lock order (server.db.audit.lock): the audit log first, then the alert's row, which the
    # evaluator locks when it clears the alert; so an acknowledgement and a clear serialise.
    audit.lock(session)
    alert = session.scalar(
        select(Alert)
        .where(Alert.id == alert_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if alert is None:
        raise NotFoundError(f"unknown alert {alert_id}")
    if alert.state != ALERT_RAISED:
        cleared = alert.cleared_at.isoformat() if alert.cleared_at else "earlier"
        raise ConflictError(
            f"alert {alert_id} cleared at {cleared}: only a raised alert can be acknowledged"
        )
    done = session.get(AlertAcknowledgement, alert_id)
    if done is not None:
        raise ConflictError(_already(done))
    ack = AlertAcknowledgement(
        alert_id=alert_id, acknowledged_by=actor, acknowledged_at=now, note=note
    )
    session.add(ack)
    try:
        session.flush()
    except IntegrityError as exc:  # another process acknowledged it meanwhile
        session.rollback()
        again = session.get(AlertAcknowledgement, alert_id)
        raise ConflictError(_already(again) if again else f"alert {alert_id}: {exc}") from exc
    audit.record(
        session,
        actor=actor,
        action="alert.acknowledge",
        subject=f"alert:{alert_id}",
        details={
            "rule": alert.rule,
            "model_line": alert.model_line,
            "model_version": alert.model_version,
            "group": alert.group_name,
            "note": note,
        },
        now=now,
    )
    if webhook:
        queue_webhook(session, alert, EVENT, now=now, public_url=public_url, acknowledgement=ack)
    session.commit()
    return alert, ack


def _already(ack: AlertAcknowledgement) -> str:
    return (
        f"alert {ack.alert_id} was already acknowledged by {ack.acknowledged_by} "
        f"at {ack.acknowledged_at.isoformat()}"
    )


__all__ = ["EVENT", "MAX_NOTE_CHARS", "acknowledge"]
