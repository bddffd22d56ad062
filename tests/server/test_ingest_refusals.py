"""Ingest refusals, case by case (issue 12), on SQLite and the real PostgreSQL.

A row the database itself refuses (a trigger stands in for any constraint a report could break)
costs only that report: the writer splits the batch and stores the rest. Oversize payloads are
queued as size and head only, refusals are kept per device up to a bound, the bridge's callback
survives what paho hands it, and an existing database gains the new ``device_events.dropped``
column when the server starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from contract import Topics
from contract.messages import MAX_MESSAGE_BYTES
from server.db.fleet import DeviceEvent, DeviceMetric
from server.db.reports import MAX_REFUSED_PER_DEVICE, RefusedReport
from server.fleet.mqtt_bridge import MqttBridge
from server.main import create_app
from server.services import Services
from tests.conftest import write_key_pair
from tests.server.conftest import authed_client, create_line, make_settings, register, services_of

TOPICS = Topics()
DEVICE = "cam-1"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/edgeloop.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def app_client(tmp_path: Path, backend_url: str, signing_key: Any) -> Iterator[TestClient]:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, backend_url, signing_key_path=priv, ingest_batch_wait_s=0.001
    )
    with authed_client(create_app(settings)) as client:
        create_line(client)
        register(client, DEVICE)
        yield client


def bridge_of(services: Services, **kw: Any) -> MqttBridge:
    """A bridge that never connects: ``handle`` is what paho's on_message calls."""
    return MqttBridge(host="127.0.0.1", port=1, ingest_queue=services.ingest_queue, **kw)


def status(reason: str, ts: float = 1.0) -> bytes:
    return json.dumps(
        {
            "device_id": DEVICE,
            "ts": ts,
            "state": "failed",
            "model_line": "digits",
            "model_version": 1,
            "release": 1,
            "reason": reason,
        }
    ).encode()


def metrics() -> bytes:
    return json.dumps(
        {
            "device_id": DEVICE,
            "ts": 1.0,
            "model_line": "digits",
            "model_version": 1,
            "window_s": 10.0,
            "inferences": 10,
            "errors": 0,
            "labelled": 5,
            "correct": 4,
            "latency_ms_p50": 1.0,
            "latency_ms_p95": 2.0,
        }
    ).encode()


def poison(engine: sa.Engine, table: str, column: str, marker: str) -> None:
    """A trigger that makes the database refuse rows of ``table`` whose ``column`` holds
    ``marker``: a stand-in for any constraint one report could break."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER poison_{table} BEFORE INSERT ON {table} "
                f"WHEN instr(NEW.{column}, '{marker}') > 0 "
                "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE FUNCTION poison_{table}() RETURNS trigger AS $$ BEGIN "
                f"IF strpos(NEW.{column}, '{marker}') > 0 THEN RAISE EXCEPTION 'poisoned row'; "
                "END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                f"CREATE TRIGGER poison_{table} BEFORE INSERT ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION poison_{table}()"
            )


def counts(services: Services) -> tuple[int, int, int]:
    with services.sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(DeviceEvent)) or 0,
            s.scalar(select(func.count()).select_from(DeviceMetric)) or 0,
            s.scalar(select(func.count()).select_from(RefusedReport)) or 0,
        )


def test_a_row_the_database_refuses_costs_only_that_report(app_client: TestClient) -> None:
    services = services_of(app_client)
    poison(services.engine, "device_events", "reason", "POISON")
    bridge = bridge_of(services)
    for i in range(40):
        bridge.handle(TOPICS.status(DEVICE), status("POISON" if i == 17 else f"ok {i}", ts=i))
        bridge.handle(TOPICS.metrics(DEVICE), metrics())
    assert services.ingest.drain() == 80
    assert counts(services) == (39, 40, 1)
    stats = services.ingest.stats
    assert stats.batch_fallbacks >= 1 and stats.failed_writes == 0
    assert stats.batches <= 2 * 7  # halves down to the one report: about log2(80) per side
    (row,) = app_client.get(f"/api/v1/devices/{DEVICE}/refused").json()
    assert (
        row["reason"].startswith("the database refused the report") and "POISON" in row["excerpt"]
    )
    # The newest good report (ts 39) still set the device's state.
    device = app_client.get(f"/api/v1/devices/{DEVICE}").json()
    assert device["last_reason"] == "ok 39"


def test_a_report_whose_refusal_cannot_be_stored_either_is_counted_lost(
    app_client: TestClient,
) -> None:
    services = services_of(app_client)
    poison(services.engine, "device_events", "reason", "POISON")
    poison(services.engine, "refused_reports", "excerpt", "POISON")
    bridge = bridge_of(services)
    for i in range(10):
        bridge.handle(TOPICS.status(DEVICE), status("POISON" if i == 3 else f"ok {i}", ts=i))
    assert services.ingest.drain() == 10
    assert counts(services) == (9, 0, 0)
    assert services.ingest.stats.failed_writes == 1
    assert "poisoned row" in (services.ingest.stats.last_error or "")


def test_oversize_payloads_are_queued_as_size_and_head_and_refused(
    app_client: TestClient,
) -> None:
    services = services_of(app_client)
    bridge = bridge_of(services)
    huge = b'{"device_id": "cam-1", "reason": "' + b"x" * (MAX_MESSAGE_BYTES + 10) + b'"}'
    bridge.handle(TOPICS.status(DEVICE), huge)
    (item,) = list(services.ingest_queue.queue)
    assert len(item[2].head) <= 512  # never the whole payload in memory
    assert bridge.stats.oversize == 1
    services.ingest.drain()
    (row,) = app_client.get(f"/api/v1/devices/{DEVICE}/refused").json()
    assert row["size"] == len(huge) and f"limit {MAX_MESSAGE_BYTES}" in row["reason"]
    assert row["excerpt"].startswith('{"device_id": "cam-1"') and len(row["excerpt"]) <= 512


def test_refusals_are_kept_per_device_up_to_a_bound(app_client: TestClient) -> None:
    services = services_of(app_client)
    bridge = bridge_of(services)
    for i in range(MAX_REFUSED_PER_DEVICE + 5):
        bridge.handle(TOPICS.status(DEVICE), f"not json {i}".encode())
    services.ingest.drain()
    bridge.handle(TOPICS.status(DEVICE), b"not json, the newest")
    services.ingest.drain()
    rows = app_client.get(f"/api/v1/devices/{DEVICE}/refused?limit=500").json()
    assert len(rows) == MAX_REFUSED_PER_DEVICE
    assert rows[0]["excerpt"] == "not json, the newest"
    assert rows[-1]["excerpt"] == "not json 6"  # the oldest ones went
    assert services.ingest.stats.invalid == MAX_REFUSED_PER_DEVICE + 6
    # Unregistered devices get nothing stored (no operator can look them up); only counted.
    bridge.handle(TOPICS.status("ghost"), b"not json")
    services.ingest.drain()
    assert counts(services)[2] == MAX_REFUSED_PER_DEVICE
    assert services.ingest.stats.unknown_device == 1


def test_the_bridge_callback_survives_what_paho_hands_it(app_client: TestClient) -> None:
    services = services_of(app_client)

    def revoked(device_id: str) -> bool:
        raise RuntimeError("revocation list unavailable")

    bridge = bridge_of(services, is_revoked=revoked)
    assert bridge._client.suppress_exceptions
    bad_topic = mqtt.MQTTMessage(topic=b"edgeloop/v1/devices/\xff/status")
    bad_topic.payload = b"{}"
    bridge._on_message(bridge._client, None, bad_topic)
    assert bridge.stats.bad_topic == 1
    ok = mqtt.MQTTMessage(topic=TOPICS.status(DEVICE).encode())
    ok.payload = status("fine")
    bridge._on_message(bridge._client, None, ok)  # is_revoked raises: counted, not raised
    assert bridge.stats.errors == 1 and services.ingest_queue.qsize() == 0


def test_a_database_outage_is_not_blamed_on_a_report(tmp_path: Path, signing_key: Any) -> None:
    """SQLite reports a missing table as an OperationalError, as it reports a lock timeout: the
    batch is counted lost at once, never split into halves that would each fail (or wait) again."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    url = f"sqlite:///{tmp_path}/edgeloop.db"
    settings = make_settings(tmp_path, url, signing_key_path=priv, ingest_batch_wait_s=0.001)
    with authed_client(create_app(settings)) as client:
        create_line(client)
        register(client, DEVICE)
        services = services_of(client)
        bridge = bridge_of(services)
        with services.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE device_events RENAME TO device_events_away")
        for i in range(20):
            bridge.handle(TOPICS.status(DEVICE), status(f"ok {i}", ts=i))
        assert services.ingest.drain() == 20
        stats = services.ingest.stats
        assert (stats.failed_writes, stats.batch_fallbacks, stats.invalid) == (20, 0, 0)
        with services.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE device_events_away RENAME TO device_events")
        bridge.handle(TOPICS.status(DEVICE), status("back", ts=99))
        services.ingest.drain()
        assert client.get(f"/api/v1/devices/{DEVICE}").json()["last_reason"] == "back"
