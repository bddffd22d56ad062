"""Monitoring tables (same ``Base``): device summaries, window figures, alerts and their delivery.

- ``monitor_summaries``: one row per accepted ``contract.monitoring.MonitorSummary`` (one device,
  one period, one model version), written by the ingest writer in its batches. ``received_at``
  (the server's clock) places it in a window; the device's own ``period_start``/``period_end``
  are kept for the record. Pruned after ``Settings.monitor_retention_s``.
- ``monitor_windows``: what the evaluator found in one closed window for one (model line,
  version, device group): the drift verdict, the label-free accuracy estimate, live accuracy,
  latency and error rate. One row per key and window (unique), written once.
- ``monitor_cursors``: per model line, the start of the first window not yet evaluated.
- ``alert_states``: the hysteresis state of each (rule, line, version, group):
  ``server.monitoring.rules.AlertState`` plus where the current breaching streak began and the
  open alert. One writer: the evaluator.
- ``alerts``: one row per raised alert, updated while it stays raised and when it clears, with
  the figures of the window that raised it and the training job it queued, if any.
- ``alert_acknowledgements``: who acknowledged a raised alert, when, and their note (at most one
  per alert). A table of its own, not columns on ``alerts``, so each keeps one writer: the
  evaluator writes alerts, ``server.monitoring.acknowledge`` writes acknowledgements. An alert
  that clears and is raised again is a new alert, unacknowledged.
- ``webhook_deliveries``: the durable outbox of webhook POSTs (one per alert transition or
  acknowledgement), with attempts, the next attempt's time and the last error; a restart resumes
  pending ones.

Group ``*`` (:data:`ALL_DEVICES`) is every device of the model version, whatever its groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.core.errors import NotFoundError
from server.db.base import Base, BigId, UTCDateTime, utcnow

ALL_DEVICES = "*"  # the group name of a whole version's fleet
ALERT_RAISED = "raised"
ALERT_CLEARED = "cleared"
DELIVERY_PENDING = "pending"
DELIVERY_DELIVERED = "delivered"
DELIVERY_FAILED = "failed"  # gave up after Settings.webhook_max_attempts
MAX_LISTED = 500  # rows one API call returns


class MonitorSummaryRow(Base):
    __tablename__ = "monitor_summaries"
    __table_args__ = (Index("ix_monitor_summaries_line_received", "model_line", "received_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128))
    model_line: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    release: Mapped[int | None] = mapped_column(Integer)
    period_start: Mapped[float] = mapped_column(Float)  # unix seconds, device clock
    period_end: Mapped[float] = mapped_column(Float)  # unix seconds, device clock
    samples: Mapped[int] = mapped_column(BigInteger)
    counts: Mapped[dict[str, list[int]]] = mapped_column(JSON)  # signal -> bin counts
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MonitorWindow(Base):
    __tablename__ = "monitor_windows"
    __table_args__ = (
        UniqueConstraint("model_line", "model_version", "group_name", "window_start"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_line: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    group_name: Mapped[str] = mapped_column(String(128))  # a device group, or ALL_DEVICES
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    devices: Mapped[int] = mapped_column(Integer)  # devices that reported in the window
    summaries: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(BigInteger)  # inferences the summaries cover
    drift_breach: Mapped[bool | None] = mapped_column(Boolean)  # None: not scored
    drift_ratio: Mapped[float | None] = mapped_column(Float)  # max PSI / its threshold
    drifted: Mapped[list[str] | None] = mapped_column(JSON)  # signals over threshold
    drift: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # WindowVerdict.to_dict()
    estimated_accuracy: Mapped[float | None] = mapped_column(Float)
    estimated_low: Mapped[float | None] = mapped_column(Float)
    estimated_high: Mapped[float | None] = mapped_column(Float)
    reference_accuracy: Mapped[float | None] = mapped_column(Float)
    labelled: Mapped[int] = mapped_column(BigInteger, default=0)
    correct: Mapped[int] = mapped_column(BigInteger, default=0)
    live_accuracy: Mapped[float | None] = mapped_column(Float)
    live_low: Mapped[float | None] = mapped_column(Float)
    live_high: Mapped[float | None] = mapped_column(Float)
    inferences: Mapped[int] = mapped_column(BigInteger, default=0)  # from metrics reports
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    breaches: Mapped[list[str]] = mapped_column(JSON, default=list)  # rules breached
    note: Mapped[str | None] = mapped_column(Text)  # why a figure is missing
    evaluated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MonitorCursor(Base):
    __tablename__ = "monitor_cursors"

    model_line: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_window_start: Mapped[datetime] = mapped_column(UTCDateTime)


class AlertStateRow(Base):
    __tablename__ = "alert_states"
    __table_args__ = (UniqueConstraint("rule", "model_line", "model_version", "group_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(32))  # server.monitoring.rules.Rule
    model_line: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    group_name: Mapped[str] = mapped_column(String(128))
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    breaching: Mapped[int] = mapped_column(Integer, default=0)
    clean: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    streak_start: Mapped[datetime | None] = mapped_column(UTCDateTime)  # first breaching window
    alert_id: Mapped[int | None] = mapped_column(BigInteger)  # the open alert
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_line_version", "model_line", "model_version", "state"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(32))
    model_line: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    group_name: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))  # ALERT_RAISED / ALERT_CLEARED
    first_window: Mapped[datetime] = mapped_column(UTCDateTime)  # first breaching window start
    last_window: Mapped[datetime] = mapped_column(UTCDateTime)  # latest breaching window start
    cleared_window: Mapped[datetime | None] = mapped_column(UTCDateTime)
    raised_at: Mapped[datetime] = mapped_column(UTCDateTime)
    cleared_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    value: Mapped[float | None] = mapped_column(Float)  # the judged figure when raised
    samples: Mapped[int] = mapped_column(BigInteger, default=0)
    figures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the raising window's
    retrain_job_id: Mapped[int | None] = mapped_column(BigInteger)
    retrain_note: Mapped[str | None] = mapped_column(Text)  # why it queued no training


class AlertAcknowledgement(Base):
    __tablename__ = "alert_acknowledgements"

    alert_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    acknowledged_by: Mapped[str] = mapped_column(String(128))  # the operator's name
    acknowledged_at: Mapped[datetime] = mapped_column(UTCDateTime)
    note: Mapped[str | None] = mapped_column(Text)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(BigInteger, index=True)
    event: Mapped[str] = mapped_column(String(32))  # alert.raised / .cleared / .acknowledged
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=DELIVERY_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)  # HTTP status of the last POST
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# ---------------------------------------------------------------- queries


def list_alerts(
    session: Session,
    *,
    model_line: str | None = None,
    model_version: int | None = None,
    group: str | None = None,
    rule: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> Sequence[Alert]:
    """Alerts matching every filter given, newest first."""
    stmt = select(Alert).order_by(Alert.id.desc()).limit(min(limit, MAX_LISTED))
    for column, value in (
        (Alert.model_line, model_line),
        (Alert.model_version, model_version),
        (Alert.group_name, group),
        (Alert.rule, rule),
        (Alert.state, state),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    return session.scalars(stmt).all()


def get_alert(session: Session, *, alert_id: int) -> Alert:
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise NotFoundError(f"unknown alert {alert_id}")
    return alert


def acknowledgements_of(
    session: Session, *, alert_ids: Sequence[int]
) -> dict[int, AlertAcknowledgement]:
    """The acknowledgements of the alerts given, by alert id (an unacknowledged one is absent)."""
    if not alert_ids:
        return {}
    return {
        a.alert_id: a
        for a in session.scalars(
            select(AlertAcknowledgement).where(AlertAcknowledgement.alert_id.in_(alert_ids))
        )
    }


def deliveries_of(session: Session, *, alert_id: int) -> Sequence[WebhookDelivery]:
    return session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.alert_id == alert_id)
        .order_by(WebhookDelivery.id)
    ).all()


def list_windows(
    session: Session,
    *,
    model_line: str,
    model_version: int | None = None,
    group: str | None = None,
    limit: int = 100,
) -> Sequence[MonitorWindow]:
    """Evaluated windows of a line (optionally one version and group), newest first."""
    stmt = (
        select(MonitorWindow)
        .where(MonitorWindow.model_line == model_line)
        .order_by(MonitorWindow.window_start.desc(), MonitorWindow.id.desc())
        .limit(min(limit, MAX_LISTED))
    )
    if model_version is not None:
        stmt = stmt.where(MonitorWindow.model_version == model_version)
    if group is not None:
        stmt = stmt.where(MonitorWindow.group_name == group)
    return session.scalars(stmt).all()


def active_alerts(session: Session) -> Sequence[Alert]:
    return session.scalars(select(Alert).where(Alert.state == ALERT_RAISED)).all()


def acknowledged_active_alerts(session: Session) -> Sequence[Alert]:
    """Raised alerts an operator acknowledged."""
    return session.scalars(
        select(Alert)
        .join(AlertAcknowledgement, AlertAcknowledgement.alert_id == Alert.id)
        .where(Alert.state == ALERT_RAISED)
    ).all()


def latest_windows(session: Session, *, since: datetime) -> Sequence[MonitorWindow]:
    """Each (line, version, group)'s newest window starting at or after ``since``."""
    newest = (
        select(
            MonitorWindow.model_line,
            MonitorWindow.model_version,
            MonitorWindow.group_name,
            func.max(MonitorWindow.window_start).label("ws"),
        )
        .where(MonitorWindow.window_start >= since)
        .group_by(MonitorWindow.model_line, MonitorWindow.model_version, MonitorWindow.group_name)
        .subquery()
    )
    return session.scalars(
        select(MonitorWindow).join(
            newest,
            (MonitorWindow.model_line == newest.c.model_line)
            & (MonitorWindow.model_version == newest.c.model_version)
            & (MonitorWindow.group_name == newest.c.group_name)
            & (MonitorWindow.window_start == newest.c.ws),
        )
    ).all()


def delivery_counts(session: Session) -> dict[str, int]:
    """Webhook deliveries by status."""
    return {
        status: int(n)
        for status, n in session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        )
    }


__all__ = [
    "ALERT_CLEARED",
    "ALERT_RAISED",
    "ALL_DEVICES",
    "DELIVERY_DELIVERED",
    "DELIVERY_FAILED",
    "DELIVERY_PENDING",
    "Alert",
    "AlertAcknowledgement",
    "AlertStateRow",
    "MonitorCursor",
    "MonitorSummaryRow",
    "MonitorWindow",
    "WebhookDelivery",
    "acknowledged_active_alerts",
    "acknowledgements_of",
    "active_alerts",
    "delivery_counts",
    "deliveries_of",
    "get_alert",
    "latest_windows",
    "list_alerts",
    "list_windows",
]
