"""Issue 14, capture policy: a drift alert on a device group raises the group's capture rate,
the device gets it, refuses a forged one and says so, and goes back to its default when the
alert clears.

Real parts: Mosquitto, the server app under uvicorn (HTTP on a socket) with its MQTT bridge, the
evaluator scoring the real first model's reference on the test's clock, and a real agent
(``device_agent.Agent``) subscribed to its line's and its group's policy topics, trusting the
server's signing key. The capture publisher's look is called by the test (its thread is off), so
nothing waits on wall-clock time; waits poll with a generous deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from contract import Topics
from contract.capture_policy import CapturePolicy
from device_agent.agent import Agent
from device_agent.identity import save_credential
from firmware_sim.services import free_port
from server.db.audit import AuditRecord
from server.db.capture import CapturePolicyRow
from server.main import create_app
from server.services import Services, build_services
from tests.authkit import FleetAuth, enroll
from tests.conftest import TEST_ADMIN_TOKEN, write_key_pair
from tests.device_agent.agent_testkit import make_config, public_pem
from tests.monitoring.conftest import Trained, View
from tests.monitoring.monitoring_kit import (
    LINE,
    FakeClock,
    closed,
    ingest,
    inside,
    monitor_settings,
    register_model,
    summary,
)
from tests.server.conftest import make_settings, wait_for
from tests.server.live_server import LiveServer

pytestmark = pytest.mark.slow
HALLS = {"hall-1": ("cam-1", "cam-2"), "hall-2": ("cam-3", "cam-4")}
CAPTURE = {
    "on_alerts": ["drift"],
    "uncertain_below": 0.9,
    "sample_rate": 0.5,
    "max_per_hour": 500,  # the agent below caps it at 20
    "max_per_day": 2000,
    "ttl_s": 3600,
}


@pytest.fixture
def stack(
    broker: Any, tmp_path: Path, db_url: str, signing_key: Ed25519PrivateKey, trained: Trained
) -> Iterator[tuple[Services, httpx.Client, FakeClock, Agent]]:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    port = free_port()
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        enable_mqtt=True,
        mqtt_port=broker.port,
        enable_capture_publisher=False,  # the test calls run_once
        public_url=f"http://127.0.0.1:{port}",
        **monitor_settings(),
    )
    clock = FakeClock()
    services = build_services(settings, clock=clock)
    with LiveServer(create_app(settings, services=services), port=port) as live:
        client = httpx.Client(base_url=live.url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=30)
        r = client.post(
            "/api/v1/model-lines",
            json={
                "name": LINE,
                "input_spec": {
                    "name": "input",
                    "shape": [-1, 64],
                    "dtype": "float32",
                    "min": 0.0,
                    "max": 1.0,
                },
                "labels": [str(i) for i in range(10)],
                "initial_training": False,
                "config": {"trainer": "sklearn-mlp", "capture": CAPTURE},
            },
        )
        assert r.status_code == 201, r.text
        register_model(services, trained.onnx, version=1)
        for hall, devices in HALLS.items():
            for d in devices:
                enroll(client, d, LINE, groups=[hall])
        config = make_config(
            tmp_path / "agent",
            signing_key,
            device_id="cam-1",
            groups=["hall-1"],
            server_url=live.url,
            mqtt_port=broker.port,
            bootstrap_token="",
            trusted_keys=[public_pem(signing_key)],
            capture_max_per_hour=20,
        )
        save_credential(config, client.auth.devices["cam-1"])  # type: ignore[attr-defined]
        agent = Agent(config)
        agent.start()
        try:
            wait_for(lambda: agent.status()["mqtt_connected"], timeout=60, what="agent on MQTT")
            assert services.bridge is not None
            wait_for(services.bridge.connected.is_set, timeout=60, what="bridge on MQTT")
            yield services, client, clock, agent
        finally:
            agent.stop()
            client.close()


def windows(
    services: Services,
    clock: FakeClock,
    trained: Trained,
    ks: range,
    hall_1: View,
    hall_2: View | None,
    rng: np.random.Generator,
) -> None:
    """Windows ``ks``: each device of hall-1 (and of hall-2 unless None) sends 60 inferences."""
    sending = {"hall-1": hall_1} if hall_2 is None else {"hall-1": hall_1, "hall-2": hall_2}
    for k in ks:
        reports = [
            summary(trained.reference, view, d, 60, rng)
            for hall, view in sending.items()
            for d in HALLS[hall]
        ]
        ingest(services, inside(k), reports)
        clock.set(closed(k))
        assert services.monitor.run_once() == 1


def policy_of(agent: Agent) -> dict[str, Any]:
    return agent.status()["capture_policy"]


def test_a_drift_alert_raises_the_groups_capture_policy_on_the_device(
    stack: tuple[Services, httpx.Client, FakeClock, Agent],
    trained: Trained,
    views: dict[float, View],
    signing_key: Ed25519PrivateKey,
    broker: Any,
) -> None:
    services, client, clock, agent = stack
    assert services.capture is not None
    rng = np.random.default_rng(11)
    clean, drifted = views[0.0], views[1.0]
    assert services.capture.run_once() == []  # no alert: nothing to say
    assert policy_of(agent)["source"] == "default"

    # Two drifted windows for hall-1: drift alerts on hall-1 and on the version's fleet.
    windows(services, clock, trained, range(2), drifted, clean, rng)
    raised = {a["group"] for a in client.get("/api/v1/alerts", params={"state": "raised"}).json()}
    assert raised == {"*", "hall-1"}
    issued = services.capture.run_once()
    assert sorted((p.group, p.raised) for p in issued) == [("*", True), ("hall-1", True)]
    assert services.capture.run_once() == []  # nothing changed: nothing new

    # The device (hall-1) applies both; the agent's own maximum bounds the hourly rate.
    wait_for(lambda: policy_of(agent)["applied"] == 2, timeout=60, what="policies applied")
    got = policy_of(agent)
    hall_seq = next(p.seq for p in issued if p.group == "hall-1")
    assert f"group hall-1 policy {hall_seq}" in got["source"]
    assert (got["uncertain_below"], got["sample_rate"]) == (0.9, 0.5)
    assert (got["max_per_hour"], got["max_per_day"]) == (20, 500)
    assert got["refused"] == 0

    # Recorded and audited on the server.
    listed = client.get(f"/api/v1/model-lines/{LINE}/capture-policies").json()
    assert {(p["group"], p["raised"], p["current"]) for p in listed} == {
        ("*", True, True),
        ("hall-1", True, True),
    }
    with services.sessions() as s:
        audit = s.scalars(
            select(AuditRecord).where(AuditRecord.action == "capture_policy.raise")
        ).all()
    assert sorted(a.subject for a in audit) == [
        f"line:{LINE}/group:*",
        f"line:{LINE}/group:hall-1",
    ]

    # Someone who is not the server publishes, retained, a policy asking for everything, signed
    # with another key, and then an oversized one: refused, reported to the server, no effect.
    forged = CapturePolicy.from_dict(
        {**issued[0].to_dict(), "group": "hall-1", "seq": hall_seq + 100, "sample_rate": 1.0}
    ).sign([Ed25519PrivateKey.generate()])
    topic = Topics().capture_policy(LINE, "hall-1")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        pub.publish(topic, forged.to_json(), qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: policy_of(agent)["refused"] == 1, timeout=60, what="forgery refused")
        pub.publish(topic, b"{" * 20_000, qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: policy_of(agent)["refused"] == 2, timeout=60, what="oversize refused")
    finally:
        pub.loop_stop()
        pub.disconnect()
    status = agent.status()
    assert status["healthy"] and status["workers"]["policy"]["state"] == "running"
    assert f"group hall-1 policy {hall_seq}" in status["capture_policy"]["source"]
    reasons = [r["reason"] for r in status["capture_policy"]["refusals"]]
    assert "valid signature" in reasons[0] and "20000 bytes, limit 16384" in reasons[1]

    def refused_on_server() -> list[dict[str, Any]]:
        rows = client.get("/api/v1/devices/cam-1/refused").json()
        return [r for r in rows if r["kind"] == "capture_policy"]

    stored = wait_for(lambda: len(refused_on_server()) == 2 and refused_on_server(), what="reports")
    assert {r["reason"] for r in stored} == set(reasons)

    # hall-1 is clean again: the alerts clear after three clean windows and the default goes out.
    windows(services, clock, trained, range(2, 5), clean, None, rng)
    left = client.get("/api/v1/alerts", params={"state": "raised"}).json()
    assert left == [], [(a["group"], a["rule"]) for a in left]
    cleared = services.capture.run_once()
    assert sorted((p.group, p.raised) for p in cleared) == [("*", False), ("hall-1", False)]
    wait_for(lambda: policy_of(agent)["applied"] == 4, timeout=60, what="defaults applied")
    assert policy_of(agent)["source"] == "default"
    with services.sessions() as s:
        rows = s.scalars(select(CapturePolicyRow).order_by(CapturePolicyRow.id)).all()
    assert [(r.group_name, r.raised) for r in rows] == [
        ("*", True),
        ("hall-1", True),
        ("*", False),
        ("hall-1", False),
    ]
