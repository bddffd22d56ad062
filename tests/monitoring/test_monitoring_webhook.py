"""The alert webhook's outbox against real HTTP receivers and a real database: backoff and its
cap, giving up after the last attempt with the error kept, a restart that resumes a pending
delivery, an unreachable receiver; and the settings a server refuses to start with."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from server.core.config import Settings
from server.core.errors import ConfigError
from server.db.monitoring import ALERT_RAISED, Alert, WebhookDelivery
from server.monitoring.alerts import alert_payload
from server.monitoring.webhook import backoff_s
from server.services import Services, build_services
from tests.conftest import free_port, write_key_pair
from tests.monitoring.monitoring_kit import LINE, T0, FakeClock, WebhookReceiver
from tests.server.conftest import make_settings


def settings_for(tmp_path: Path, db_url: str, signing_key: Any, **overrides: Any) -> Settings:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    return make_settings(tmp_path, db_url, signing_key_path=priv, **overrides)


def queue_alert(services: Services) -> int:
    """An alert and its delivery as the evaluator stores them (the outbox row)."""
    with services.sessions() as session:
        alert = Alert(
            rule="drift",
            model_line=LINE,
            model_version=1,
            group_name="hall-1",
            state=ALERT_RAISED,
            first_window=T0,
            last_window=T0,
            raised_at=T0,
            value=3.5,
            samples=120,
            figures={"samples": 120},
        )
        session.add(alert)
        session.flush()
        delivery = WebhookDelivery(
            alert_id=alert.id,
            event="alert.raised",
            payload=alert_payload(alert, event="alert.raised", public_url="http://edgeloop"),
            next_attempt_at=services.clock(),
            created_at=services.clock(),
        )
        session.add(delivery)
        session.commit()
        return delivery.id


def delivery(services: Services, delivery_id: int) -> WebhookDelivery:
    with services.sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


def test_backoff_doubles_up_to_its_cap_and_never_overflows() -> None:
    assert [backoff_s(a, base_s=2.0, cap_s=60.0) for a in (1, 2, 3, 4, 5, 6, 7)] == [
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        60.0,
        60.0,
    ]
    assert backoff_s(10**9, base_s=2.0, cap_s=900.0) == 900.0
    assert backoff_s(3, base_s=0.0, cap_s=10.0) == 0.0


def test_a_receiver_that_keeps_failing_gets_every_attempt_then_the_delivery_fails(
    tmp_path: Path, db_url: str, signing_key: Any
) -> None:
    clock = FakeClock()
    with WebhookReceiver(script=[503]) as receiver:
        settings = settings_for(
            tmp_path,
            db_url,
            signing_key,
            alert_webhook_url=receiver.url,
            webhook_max_attempts=3,
            webhook_backoff_s=10.0,
            webhook_backoff_max_s=15.0,
        )
        services = build_services(settings, clock=clock)
        try:
            did = queue_alert(services)
            waits = []
            for attempt in (1, 2, 3):
                assert services.webhook.run_once() == 1
                row = delivery(services, did)
                assert (row.attempts, row.last_status) == (attempt, 503)
                assert str(row.last_error).startswith("HTTP 503: ")
                assert "receiver down" in str(row.last_error)
                assert services.webhook.run_once() == 0  # not due again yet
                waits.append((row.next_attempt_at - clock()).total_seconds())
                clock.set(row.next_attempt_at)
            row = delivery(services, did)
            assert row.status == "failed" and row.delivered_at is None
            assert waits[:2] == [10.0, 15.0]  # doubled, then capped
            assert receiver.count() == 3
            clock.advance(3600)
            assert services.webhook.run_once() == 0 and receiver.count() == 3
        finally:
            services.engine.dispose()


def test_a_pending_delivery_survives_a_restart_and_an_unreachable_receiver(
    tmp_path: Path, db_url: str, signing_key: Any
) -> None:
    """The first server finds nothing listening (the error is recorded); it stops. A new server
    on the same database delivers the row once the receiver is up."""
    clock = FakeClock()
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    first = build_services(
        settings_for(tmp_path, db_url, signing_key, alert_webhook_url=url, webhook_backoff_s=5),
        clock=clock,
    )
    try:
        did = queue_alert(first)
        assert first.webhook.run_once() == 1
        row = delivery(first, did)
        assert (row.status, row.attempts, row.last_status) == ("pending", 1, None)
        assert str(row.last_error).startswith("ConnectError")
        assert row.next_attempt_at == clock() + timedelta(seconds=5)
    finally:
        first.engine.dispose()

    clock.advance(5)
    with WebhookReceiver(script=[200], port=port) as receiver:
        second = build_services(
            settings_for(tmp_path, db_url, signing_key, alert_webhook_url=url), clock=clock
        )
        try:
            assert second.webhook.run_once() == 1
            row = delivery(second, did)
            assert (row.status, row.attempts, row.last_status) == ("delivered", 2, 200)
            assert receiver.count() == 1
            assert receiver.received[0].json["alert"]["group"] == "hall-1"
        finally:
            second.engine.dispose()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alert_webhook_url": "ftp://example.org/x"}, "must be an http(s) URL"),
        ({"alert_webhook_url": "http://"}, "alert_webhook_url"),
        ({"alert_rules": ["drift", "vibes"]}, "unknown alert rule(s) ['vibes']"),
        ({"alert_policies": {"drift": {"raise_after": 0}}}, "raise_after"),
        ({"alert_policies": {"drift": {"k": 2}}}, "alert_policies['drift']"),
    ],
)
def test_the_server_refuses_to_start_with_unusable_alert_settings(
    tmp_path: Path, signing_key: Any, overrides: dict[str, Any], message: str
) -> None:
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path}/db.sqlite", signing_key, **overrides)
    with pytest.raises(ConfigError) as err:
        build_services(settings)
    assert message in err.value.message
