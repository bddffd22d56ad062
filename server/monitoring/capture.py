"""The capture-policy publisher: a drifting device group captures more uncertain inputs.

A line whose training config has a ``[capture]`` table (``training.config.CaptureConfig``) gets,
for every device group with a raised alert of one of ``capture.on_alerts`` (any version of the
line; group ``*`` is the line's whole fleet), a signed *raised* capture policy
(``contract.capture_policy``): uncertain inputs (confidence below ``uncertain_below``) sampled at
``sample_rate``, at most ``max_per_hour`` / ``max_per_day`` per device, expiring after
``ttl_s`` and renewed at half-life while the alert holds. When the alert clears (or the line drops
its ``[capture]``), the group gets a signed *default* policy: devices go back to their own
configured default (a device that misses it falls back anyway when the raised one expires).

:class:`CapturePublisher` is a reconciler and the one writer of ``capture_policies``: each look
(a background thread every ``capture_tick_s``; tests call :meth:`CapturePublisher.run_once`)
compares the raised alerts with the newest policy of each (line, group), issues what differs
(row first: its id is the policy's ``seq``; then signed with the online release key devices
trust; audited), commits, and only then publishes each as the retained message of
``Topics.capture_policy(line, group)``. :meth:`CapturePublisher.publish_current` announces
every unexpired policy again (at start, and when the broker lost our session).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from contract.capture_policy import CapturePolicy, policy_ttl
from contract.envelope import SignedEnvelope
from contract.topics import Topics
from server.core.background import Worker
from server.core.config import Settings
from server.db import audit
from server.db.base import utcnow
from server.db.capture import CapturePolicyRow
from server.db.monitoring import ALERT_RAISED, Alert
from server.db.registry import ModelLine
from server.release.signing import Signer
from training.config import CaptureConfig
from training.errors import SpecError

log = logging.getLogger(__name__)

# (topic, payload) -> None: a retained QoS 1 publish (MqttBridge.publish_retained).
RetainedPublish = Callable[[str, bytes], None]


MAX_LISTED = 500  # policies one listing returns


def list_policies(session: Session, *, line: str, limit: int) -> list[dict[str, Any]]:
    """The capture policies issued for ``line``, newest first (the audit of what each group
    was told), with whether each is still the one in force."""
    rows = session.scalars(
        select(CapturePolicyRow)
        .where(CapturePolicyRow.model_line == line)
        .order_by(CapturePolicyRow.id.desc())
        .limit(min(limit, MAX_LISTED))
    ).all()
    seen: set[str] = set()
    out = []
    for r in rows:
        out.append(
            {
                "seq": r.id,
                "model_line": r.model_line,
                "group": r.group_name,
                "raised": r.raised,
                "alert_id": r.alert_id,
                "reason": r.reason,
                "issued_at": r.issued_at,
                "expires_at": r.expires_at,
                "current": r.group_name not in seen,
                "policy": r.policy,
            }
        )
        seen.add(r.group_name)
    return out


def raised_in_force(session: Session, *, line: str, now: datetime) -> list[dict[str, Any]]:
    """Per device group of ``line``, the raised capture policy in force at ``now`` (the group's
    newest policy, raised and not expired), by group name."""
    newest: dict[str, CapturePolicyRow] = {}
    for row in session.scalars(
        select(CapturePolicyRow)
        .where(CapturePolicyRow.model_line == line)
        .order_by(CapturePolicyRow.id)
    ):
        newest[row.group_name] = row
    return [
        {
            "group": group,
            "seq": r.id,
            "alert_id": r.alert_id,
            "reason": r.reason,
            "issued_at": r.issued_at,
            "expires_at": r.expires_at,
            "uncertain_below": r.policy.get("uncertain_below"),
            "sample_rate": r.policy.get("sample_rate"),
            "max_per_hour": r.policy.get("max_per_hour"),
            "max_per_day": r.policy.get("max_per_day"),
        }
        for group, r in sorted(newest.items())
        if r.raised and r.expires_at > now
    ]


def renewal_due(row: CapturePolicyRow, now: datetime) -> bool:
    """A raised policy is renewed once half its lifetime has passed."""
    return now >= row.issued_at + (row.expires_at - row.issued_at) / 2


def capture_config(training_config: Any) -> CaptureConfig | None:
    """The line's ``[capture]`` table, or None (absent, or unreadable: logged, never raised)."""
    raw = (training_config or {}).get("capture") if isinstance(training_config, dict) else None
    if raw is None:
        return None
    try:
        return CaptureConfig.from_dict(raw)
    except SpecError as exc:
        log.error("capture config of a line is unusable, no capture policy issued: %s", exc)
        return None


class CapturePublisher:
    """Issues, records and publishes capture policies (see the module docstring)."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        signer: Signer,
        publish: RetainedPublish,
        clock: Callable[[], datetime] = utcnow,
        topics: Topics | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.signer = signer
        self.publish = publish
        self.clock = clock
        self.topics = topics or Topics()
        self.issued = 0
        self.last_error: str | None = None
        self._worker = Worker(
            "capture-publisher",
            self._step,
            error_wait_s=settings.capture_tick_s,
            on_error=self._record_error,
        )

    # ------------------------------------------------------------ reconciling

    def run_once(self) -> list[CapturePolicy]:
        """One look: issue what the raised alerts call for, commit, publish. Returns the
        policies issued."""
        now = self.clock()
        issued: list[tuple[CapturePolicy, dict[str, Any]]] = []
        with self.sessions() as session:
            for name, config in session.execute(
                select(ModelLine.name, ModelLine.training_config).order_by(ModelLine.name)
            ).all():
                issued += self._line(session, name, capture_config(config), now)
            session.commit()
        for policy, envelope in issued:
            self._publish(policy.model_line, policy.group, envelope)
        self.issued += len(issued)
        return [p for p, _ in issued]

    def _line(
        self, session: Session, line: str, capture: CaptureConfig | None, now: datetime
    ) -> list[tuple[CapturePolicy, dict[str, Any]]]:
        raised: dict[str, Alert] = {}
        if capture is not None:
            for alert in session.scalars(
                select(Alert)
                .where(
                    Alert.model_line == line,
                    Alert.state == ALERT_RAISED,
                    Alert.rule.in_(capture.on_alerts),
                )
                .order_by(Alert.id)
            ):
                raised[alert.group_name] = alert  # the newest alert of the group wins
        current: dict[str, CapturePolicyRow] = {}
        for row in session.scalars(
            select(CapturePolicyRow)
            .where(CapturePolicyRow.model_line == line)
            .order_by(CapturePolicyRow.id)
        ):
            current[row.group_name] = row
        out = []
        for group, alert in sorted(raised.items()):
            assert capture is not None
            cur = current.get(group)
            if cur is None or not cur.raised or cur.alert_id != alert.id or renewal_due(cur, now):
                out.append(self._issue(session, line, group, now, capture=capture, alert=alert))
        for group, cur in sorted(current.items()):
            if cur.raised and group not in raised:
                out.append(self._issue(session, line, group, now, capture=None, alert=None))
        return out

    def _issue(
        self,
        session: Session,
        line: str,
        group: str,
        now: datetime,
        *,
        capture: CaptureConfig | None,
        alert: Alert | None,
    ) -> tuple[CapturePolicy, dict[str, Any]]:
        """Record, sign and audit one policy (flushes; the caller commits, then publishes)."""
        raised = capture is not None and alert is not None
        ttl_s = capture.ttl_s if capture is not None else self.settings.capture_default_ttl_s
        ttl = policy_ttl(ttl_s)
        reason = (
            f"{alert.rule} alert {alert.id} on {line} v{alert.model_version} group {group}"
            if alert is not None
            else "alert cleared: back to the device default"
        )
        row = CapturePolicyRow(
            model_line=line,
            group_name=group,
            raised=raised,
            alert_id=alert.id if alert is not None else None,
            reason=reason,
            policy={},
            issued_at=now,
            expires_at=now + ttl,
        )
        session.add(row)
        session.flush()  # the id is the policy's seq
        policy = CapturePolicy(
            model_line=line,
            group=group,
            seq=row.id,
            issued_at=now,
            expires_at=now + ttl,
            raised=raised,
            uncertain_below=capture.uncertain_below if capture is not None else 0.0,
            sample_rate=capture.sample_rate if capture is not None else 0.0,
            max_per_hour=capture.max_per_hour if capture is not None else 0,
            max_per_day=capture.max_per_day if capture is not None else 0,
            alert_id=row.alert_id,
            reason=reason,
        )
        envelope = policy.sign([self.signer.key]).to_dict()
        row.policy, row.envelope = policy.to_dict(), envelope
        audit.record(
            session,
            actor="monitoring",
            action="capture_policy.raise" if raised else "capture_policy.default",
            subject=f"line:{line}/group:{group}",
            details={
                "seq": row.id,
                "alert_id": row.alert_id,
                "uncertain_below": policy.uncertain_below,
                "sample_rate": policy.sample_rate,
                "max_per_hour": policy.max_per_hour,
                "max_per_day": policy.max_per_day,
                "expires_at": policy.expires_at.isoformat(),
            },
            now=now,
        )
        log.warning("capture policy %d for %s group %s: %s", row.id, line, group, reason)
        return policy, envelope

    # ------------------------------------------------------------ publishing

    def _publish(self, line: str, group: str, envelope: dict[str, Any]) -> None:
        payload = SignedEnvelope.from_dict(envelope).to_json()
        self.publish(self.topics.capture_policy(line, group), payload)

    def publish_current(self) -> int:
        """Announce the newest unexpired policy of every (line, group) again; returns how many."""
        now = self.clock()
        with self.sessions() as session:
            newest: dict[tuple[str, str], CapturePolicyRow] = {}
            for row in session.scalars(select(CapturePolicyRow).order_by(CapturePolicyRow.id)):
                newest[(row.model_line, row.group_name)] = row
            live = [
                (r.model_line, r.group_name, dict(r.envelope))
                for r in newest.values()
                if r.envelope is not None and r.expires_at > now
            ]
        for line, group, envelope in live:
            self._publish(line, group, envelope)
        return len(live)

    # ------------------------------------------------------------ thread

    @property
    def running(self) -> bool:
        return self._worker.running

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop(timeout=30)

    def wake(self) -> None:
        self._worker.wake()

    def _step(self) -> float:
        self.run_once()
        return self.settings.capture_tick_s

    def _record_error(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]


__all__ = ["CapturePublisher", "RetainedPublish", "capture_config", "list_policies"]
