"""The rules advanced over one window's figures: window rows, alert states, alerts, deliveries.

:func:`record_window` runs in the evaluator's transaction for one (line, window) and is the one
writer of ``monitor_windows``, ``alert_states`` and ``alerts``. Per (version, group) it stores the
window's figures, asks each enabled rule for its observation (``rules.observe``), advances the
hysteresis (``rules.advance``: k breaching windows and a minimum sample count raise, m clean ones
clear) and acts on each transition:

- raised: an ``alerts`` row with the window's figures and the first and last breaching window;
  the retraining hook (``on_raised``, wired by the composition root to
  ``server.retrain.scheduler.retrain_for_alert``) may queue a training and says what it did;
- cleared: the alert's row is closed;
- either: a webhook delivery is queued in the outbox (``webhook_deliveries``) when a webhook
  URL is configured. It goes out later, from the sender's thread (``server.monitoring.webhook``).

Persist, then act: everything above commits together, so a crash loses no transition and sends
no alert that was not stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.core.errors import ConfigError
from server.db.monitoring import (
    ALERT_CLEARED,
    ALERT_RAISED,
    Alert,
    AlertAcknowledgement,
    AlertStateRow,
    MonitorWindow,
    WebhookDelivery,
)
from server.monitoring._errors import MonitoringError
from server.monitoring.rules import (
    DEFAULT_POLICIES,
    AlertState,
    AlertThresholds,
    Hysteresis,
    Observation,
    Rule,
    Transition,
    advance,
    observe,
)
from server.monitoring.windows import KeyWindow

StateKey = tuple[str, int, str]  # (rule, model version, group)


@dataclass(frozen=True)
class AlertConfig:
    """Which rules run, their hysteresis and bounds (from Settings, checked at startup)."""

    rules: frozenset[Rule]
    policies: Mapping[Rule, Hysteresis]
    bounds: AlertThresholds
    webhook: bool  # a webhook URL is configured: queue deliveries

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertConfig:
        """Raises ConfigError naming an unknown rule, policy field or an unusable webhook URL."""
        known = {r.value: r for r in Rule}
        unknown = sorted(set(settings.alert_rules) - set(known))
        unknown += sorted(set(settings.alert_policies) - set(known))
        if unknown:
            raise ConfigError(f"unknown alert rule(s) {unknown}; known: {sorted(known)}")
        policies = dict(DEFAULT_POLICIES)
        for name, values in settings.alert_policies.items():
            try:
                policies[known[name]] = replace(policies[known[name]], **values)
            except (TypeError, MonitoringError) as exc:
                raise ConfigError(f"alert_policies[{name!r}]: {exc}") from exc
        url = settings.alert_webhook_url
        if url:
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise ConfigError(f"alert_webhook_url {url!r}: {exc}") from exc
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise ConfigError(f"alert_webhook_url must be an http(s) URL, got {url!r}")
        return cls(
            rules=frozenset(known[r] for r in settings.alert_rules),
            policies=policies,
            bounds=AlertThresholds(
                max_accuracy_drop=settings.alert_max_accuracy_drop,
                max_latency_p95_ms=settings.alert_max_latency_p95_ms,
                max_error_rate=settings.alert_max_error_rate,
            ),
            webhook=bool(url),
        )


@dataclass(frozen=True)
class RaisedAlert:
    """An alert just raised (flushed, not committed), as the retraining hook sees it."""

    id: int
    rule: str
    model_line: str
    model_version: int
    group: str
    raised_at: datetime


# The retraining hook: (session, alert) -> (queued job id, or None and why not / None).
RetrainHook = Callable[[Session, RaisedAlert], tuple[int | None, str | None]]


@dataclass
class WindowOutcome:
    """What recording one window did (for the evaluator's wake-ups and the logs)."""

    keys: int = 0
    raised: list[int] = field(default_factory=list)  # alert ids
    cleared: list[int] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)  # training jobs queued by raised alerts
    deliveries: int = 0


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON columns on PostgreSQL, and
    webhook receivers, refuse NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def figures_dict(w: KeyWindow) -> dict[str, Any]:
    """The figures of one key's window as stored on an alert and sent to the webhook."""
    f = w.figures
    out: dict[str, Any] = {
        "devices": w.devices,
        "summaries": w.summaries,
        "samples": w.samples,
        "inferences": f.inferences,
        "errors": f.errors,
        "error_rate": f.errors / f.inferences if f.inferences else None,
        "latency_p95_ms": f.latency_p95_ms,
        "labelled": w.labelled,
        "live_accuracy": f.live.accuracy if f.live else None,
        "estimated_accuracy": f.estimate.accuracy if f.estimate else None,
        "reference_accuracy": f.estimate.reference_accuracy if f.estimate else None,
        "note": w.note,
    }
    if f.drift is not None:
        out["drift"] = f.drift.to_dict()
    return json_safe(out)


def _window_row(
    line: str, start: datetime, end: datetime, w: KeyWindow, obs: Mapping[Rule, Observation]
) -> MonitorWindow:
    f = w.figures
    d, est, live = f.drift, f.estimate, f.live
    ratio = (
        max((s.psi / max(s.psi_threshold, 1e-12) for s in d.scores), default=None) if d else None
    )
    return MonitorWindow(
        model_line=line,
        model_version=w.version,
        group_name=w.group,
        window_start=start,
        window_end=end,
        devices=w.devices,
        summaries=w.summaries,
        samples=w.samples,
        drift_breach=d.breach if d is not None and d.scores else None,
        drift_ratio=ratio,
        drifted=list(d.drifted) if d is not None else None,
        drift=json_safe(d.to_dict()) if d is not None else None,
        estimated_accuracy=est.accuracy if est else None,
        estimated_low=est.low if est else None,
        estimated_high=est.high if est else None,
        reference_accuracy=_finite(est.reference_accuracy) if est else None,
        labelled=w.labelled,
        correct=w.correct,
        live_accuracy=live.accuracy if live else None,
        live_low=live.low if live else None,
        live_high=live.high if live else None,
        inferences=f.inferences,
        errors=f.errors,
        latency_p95_ms=f.latency_p95_ms,
        breaches=sorted(r.value for r, o in obs.items() if o.breach),
        note=w.note,
    )


def alert_payload(
    alert: Alert,
    *,
    event: str,
    public_url: str,
    acknowledgement: AlertAcknowledgement | None = None,
) -> dict[str, Any]:
    """The JSON document a webhook receives for one alert transition (or acknowledgement:
    ``acknowledgement`` then says who, when and their note)."""
    iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
    extra: dict[str, Any] = {}
    if acknowledgement is not None:
        extra["acknowledgement"] = {
            "by": acknowledgement.acknowledged_by,
            "at": iso(acknowledgement.acknowledged_at),
            "note": acknowledgement.note,
        }
    return json_safe(
        {
            "event": event,
            **extra,
            "alert": {
                "id": alert.id,
                "rule": alert.rule,
                "model_line": alert.model_line,
                "model_version": alert.model_version,
                "group": alert.group_name,
                "state": alert.state,
                "first_window": iso(alert.first_window),
                "last_window": iso(alert.last_window),
                "cleared_window": iso(alert.cleared_window),
                "raised_at": iso(alert.raised_at),
                "cleared_at": iso(alert.cleared_at),
                "value": alert.value,
                "samples": alert.samples,
                "figures": alert.figures,
                "retrain_job_id": alert.retrain_job_id,
                "retrain_note": alert.retrain_note,
                "url": f"{public_url.rstrip('/')}/api/v1/alerts/{alert.id}",
            },
        }
    )


def record_window(
    session: Session,
    *,
    line: str,
    start: datetime,
    end: datetime,
    windows: list[KeyWindow],
    config: AlertConfig,
    now: datetime,
    public_url: str = "",
    on_raised: RetrainHook | None = None,
) -> WindowOutcome:
    """Store one window's figures and advance every alert it observes; flushes, the caller
    commits. See the module docstring."""
    out = WindowOutcome(keys=len(windows))
    observations: dict[StateKey, Observation] = {}
    by_key: dict[tuple[int, str], KeyWindow] = {}
    for w in windows:
        seen = {r: o for r, o in observe(w.figures, config.bounds).items() if r in config.rules}
        session.add(_window_row(line, start, end, w, seen))
        by_key[(w.version, w.group)] = w
        for rule, o in seen.items():
            observations[(rule.value, w.version, w.group)] = o
    if not observations:
        session.flush()
        return out
    versions = sorted({k[1] for k in observations})
    rows = {
        (r.rule, r.model_version, r.group_name): r
        for r in session.scalars(
            select(AlertStateRow).where(
                AlertStateRow.model_line == line, AlertStateRow.model_version.in_(versions)
            )
        )
    }
    states = {
        key: AlertState(r.active, r.breaching, r.clean, r.skipped)
        for key, r in rows.items()
        if key in observations
    }
    policies = {key: config.policies[Rule(key[0])] for key in observations}
    new_states, transitions = advance(states, observations, policies)
    changed = dict(transitions)
    for key, state in new_states.items():
        rule_name, version, group = key
        row = rows.get(key)
        if row is None:
            row = AlertStateRow(
                rule=rule_name, model_line=line, model_version=version, group_name=group
            )
            session.add(row)
        obs = observations[key]
        if obs.samples >= policies[key].min_samples:
            if obs.breach and state.breaching == 1:
                row.streak_start = start
            elif not obs.breach and not state.active:
                row.streak_start = None
        row.active, row.breaching, row.clean, row.skipped = (
            state.active,
            state.breaching,
            state.clean,
            state.skipped,
        )
        row.updated_at = now
        change = changed.get(key)
        if change is Transition.RAISED:
            raised = Alert(
                rule=rule_name,
                model_line=line,
                model_version=version,
                group_name=group,
                state=ALERT_RAISED,
                first_window=row.streak_start or start,
                last_window=start,
                raised_at=now,
                value=_finite(obs.value),
                samples=obs.samples,
                figures=figures_dict(by_key[(version, group)]),
            )
            session.add(raised)
            session.flush()
            row.alert_id = raised.id
            out.raised.append(raised.id)
            if on_raised is not None:
                job_id, note = on_raised(
                    session, RaisedAlert(raised.id, rule_name, line, version, group, now)
                )
                raised.retrain_job_id, raised.retrain_note = job_id, note
                if job_id is not None:
                    out.jobs.append(job_id)
            out.deliveries += _queue(session, raised, "alert.raised", config, now, public_url)
            continue
        open_alert = session.get(Alert, row.alert_id) if row.alert_id is not None else None
        if open_alert is None:
            continue
        if change is Transition.CLEARED:
            row.alert_id = None
            open_alert.state = ALERT_CLEARED
            open_alert.cleared_at = now
            open_alert.cleared_window = start
            out.cleared.append(open_alert.id)
            out.deliveries += _queue(session, open_alert, "alert.cleared", config, now, public_url)
        elif state.active and obs.breach and obs.samples >= policies[key].min_samples:
            open_alert.last_window = start
    session.flush()
    return out


def _queue(
    session: Session, alert: Alert, event: str, config: AlertConfig, now: datetime, url: str
) -> int:
    if not config.webhook:
        return 0
    session.flush()
    queue_webhook(session, alert, event, now=now, public_url=url)
    return 1


def queue_webhook(
    session: Session,
    alert: Alert,
    event: str,
    *,
    now: datetime,
    public_url: str,
    acknowledgement: AlertAcknowledgement | None = None,
) -> None:
    """Add ``event``'s delivery for ``alert`` to the webhook outbox (sent by
    ``server.monitoring.webhook``), in the caller's transaction."""
    session.add(
        WebhookDelivery(
            alert_id=alert.id,
            event=event,
            payload=alert_payload(
                alert, event=event, public_url=public_url, acknowledgement=acknowledgement
            ),
            next_attempt_at=now,
            created_at=now,
        )
    )


__all__ = [
    "AlertConfig",
    "RaisedAlert",
    "RetrainHook",
    "WindowOutcome",
    "alert_payload",
    "figures_dict",
    "json_safe",
    "queue_webhook",
    "record_window",
]
