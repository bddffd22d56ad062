"""The MQTT bridge and ingest writer against a real Mosquitto."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from contract import MetricsReport, StatusReport, TargetMessage, Topics
from contract.messages import DeviceState
from server.db.fleet import DeviceEvent, DeviceMetric
from server.main import create_app
from tests.conftest import write_key_pair
from tests.server.conftest import (
    add_version,
    authed_client,
    create_line,
    make_settings,
    register,
    services_of,
    wait_for,
)

N_DEVICES = 20
PER_DEVICE = 10


def client_for(broker) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def bridge_settings(tmp_path: Path, db_url: str, signing_key, broker, **overrides):
    """Settings of a test app whose MQTT bridge talks to ``broker``."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    return make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        enable_mqtt=True,
        mqtt_port=broker.port,
        **overrides,
    )


def test_messages_from_devices_land_in_the_db_in_batches(
    broker, tmp_path: Path, db_url: str, signing_key
) -> None:
    settings = bridge_settings(
        tmp_path,
        db_url,
        signing_key,
        broker,
        enable_ingest_writer=True,
    )
    topics = Topics()
    with authed_client(create_app(settings)) as client:
        services = services_of(client)
        create_line(client)
        devices = [f"dev-{i:03d}" for i in range(N_DEVICES)]
        for d in devices:
            register(client, d)
        assert services.bridge is not None
        wait_for(services.bridge.connected.is_set, what="bridge connected")
        pub = client_for(broker)
        infos = []
        for k in range(PER_DEVICE):
            for d in devices:
                s = StatusReport(
                    device_id=d,
                    ts=float(k),
                    state=DeviceState.DOWNLOADING,
                    model_line="digits",
                    model_version=1,
                    release=1,
                )
                m = MetricsReport(
                    device_id=d,
                    ts=float(k),
                    model_line="digits",
                    model_version=1,
                    window_s=5.0,
                    inferences=10,
                    errors=0,
                    labelled=4,
                    correct=3,
                    latency_ms_p50=1.0,
                    latency_ms_p95=2.0,
                )
                infos.append(pub.publish(topics.status(d), s.to_json(), qos=1))
                infos.append(pub.publish(topics.metrics(d), m.to_json(), qos=1))
        # Invalid traffic: not JSON, wrong schema, payload for another device, unknown device.
        bad = [
            (topics.status(devices[0]), b"\xff not json"),
            (topics.metrics(devices[0]), json.dumps({"device_id": devices[0]}).encode()),
            (
                topics.status(devices[1]),
                StatusReport(
                    device_id=devices[2],
                    ts=1.0,
                    state=DeviceState.IDLE,
                    model_line="digits",
                    model_version=1,
                    release=1,
                ).to_json(),
            ),
            (
                topics.status("ghost"),
                StatusReport(
                    device_id="ghost",
                    ts=1.0,
                    state=DeviceState.IDLE,
                    model_line="digits",
                    model_version=1,
                    release=1,
                ).to_json(),
            ),
        ]
        for topic, payload in bad:
            infos.append(pub.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(10)
        total = N_DEVICES * PER_DEVICE

        def counts() -> tuple[int, int]:
            with services.sessions() as s:
                return (
                    s.scalar(select(func.count()).select_from(DeviceMetric)) or 0,
                    s.scalar(select(func.count()).select_from(DeviceEvent)) or 0,
                )

        wait_for(lambda: counts() == (total, total), what="all messages written")
        stats = services.ingest.stats
        wait_for(lambda: stats.invalid == 3 and stats.unknown_device == 1, what="bad counted")
        assert stats.batches < 2 * total  # batched, not one transaction per message
        d0 = client.get(f"/api/v1/devices/{devices[0]}").json()
        assert d0["state"] == "downloading" and d0["last_seen"] is not None
        health = client.get("/healthz").json()
        assert health["mqtt"]["connected"] is True and health["ingest"]["invalid"] == 3
        pub.loop_stop()
        pub.disconnect()


def test_targets_are_published_retained_and_broker_outage_is_survived(
    broker, tmp_path: Path, db_url: str, signing_key
) -> None:
    settings = bridge_settings(
        tmp_path,
        db_url,
        signing_key,
        broker,
        enable_ingest_writer=True,
        mqtt_reconnect_max_s=1,
    )
    topics = Topics()
    with authed_client(create_app(settings)) as client:
        services = services_of(client)
        create_line(client)
        for d in ("cam-a", "cam-b"):
            register(client, d)
        add_version(services, version=1, status="champion", champion_release=True)
        add_version(services, version=2, status="candidate")
        assert services.bridge is not None
        wait_for(services.bridge.connected.is_set, what="bridge connected")

        broker.stop()  # the server keeps answering; devices can still poll /target
        wait_for(lambda: not services.bridge.connected.is_set(), what="bridge noticed outage")
        assert client.get("/healthz").status_code == 200
        rid = client.post(
            "/api/v1/rollouts",
            json={
                "model_line": "digits",
                "model_version": 2,
                "canary_percent": 50,
            },
        ).json()["id"]
        approved = client.post(f"/api/v1/rollouts/{rid}/approve", json={})
        assert approved.status_code == 200
        assert client.get("/api/v1/devices/cam-a/target").status_code == 200
        broker.start()
        wait_for(services.bridge.connected.is_set, timeout=30, what="bridge reconnected")

        got: dict[str, TargetMessage] = {}
        lock = threading.Lock()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

        def on_message(_c, _u, msg) -> None:
            parsed = topics.parse(msg.topic)
            assert parsed is not None
            with lock:
                got[parsed[0]] = TargetMessage.from_dict(msg.payload)

        sub.on_message = on_message
        sub.connect(broker.host, broker.port)
        sub.subscribe(f"{topics.prefix}/devices/+/target", qos=1)
        sub.loop_start()
        try:
            with services.sessions() as s:
                from server.db.rollouts import RolloutDevice

                canary = s.scalars(
                    select(RolloutDevice.device_id).where(
                        RolloutDevice.rollout_id == rid, RolloutDevice.stage == 0
                    )
                ).all()
            assert len(canary) == 1
            (other,) = {"cam-a", "cam-b"} - set(canary)
            wait_for(lambda: canary[0] in got, timeout=30, what="retained canary target")
            assert got[canary[0]].rollout_id == rid
            # The device outside the canary keeps the champion's release, never the new one.
            assert other not in got or got[other].rollout_id is None
            other_target = client.get(f"/api/v1/devices/{other}/target").json()
            assert other_target["rollout_id"] is None
        finally:
            sub.loop_stop()
            sub.disconnect()


def test_no_report_is_lost_when_the_server_stops_while_devices_report(
    broker, tmp_path: Path, db_url: str, signing_key
) -> None:
    """Reports keep arriving while the server shuts down and while it is away: every one the
    broker accepted is stored once the server is back (the bridge disconnects before the ingest
    writer's last drain; the broker holds the rest in the server's persistent session)."""
    settings = bridge_settings(
        tmp_path,
        db_url,
        signing_key,
        broker,
        enable_ingest_writer=True,
        mqtt_client_id="edgeloop-server-restart-test",  # the same session across the restart
        mqtt_shared_group="edgeloop-server",
    )
    topics = Topics()
    device = "dev-restart"
    sent: list[float] = []
    stop = threading.Event()

    def publish() -> None:
        pub = client_for(broker)
        i = 0
        while not stop.is_set():
            ts = 1_700_000_000.0 + i
            report = StatusReport(device, ts, DeviceState.IDLE, "digits", 1, 1)
            pub.publish(topics.status(device), report.to_json(), qos=1).wait_for_publish(10)
            sent.append(ts)
            i += 1
            stop.wait(0.005)
        pub.disconnect()
        pub.loop_stop()

    with authed_client(create_app(settings)) as client:
        create_line(client)
        register(client, device)
        bridge = services_of(client).bridge
        assert bridge is not None
        wait_for(bridge.connected.is_set, what="bridge connected")
        publisher = threading.Thread(target=publish)
        publisher.start()
        wait_for(lambda: len(sent) >= 200, what="reports flowing")
    # The app has stopped (lifespan exit) while the publisher went on; it goes on a little more.
    wait_for(lambda: len(sent) >= 400, what="reports while the server is away")
    stop.set()
    publisher.join(30)
    with authed_client(create_app(settings)) as client:
        services = services_of(client)

        def stored() -> set[float]:
            with services.sessions() as session:
                return set(
                    session.scalars(select(DeviceEvent.ts).where(DeviceEvent.device_id == device))
                )

        wait_for(lambda: stored() >= set(sent), timeout=60, what="every report stored")
        assert stored() == set(sent)


def test_a_broker_that_lost_its_state_gets_every_target_again(
    broker, tmp_path: Path, db_url: str, signing_key
) -> None:
    """A broker that comes back without its persistence file (crashed between saves, replaced,
    a new cluster node) has lost the retained targets too: the server finds no session of its
    own on reconnect and announces every target again, so devices that subscribe get one."""
    settings = bridge_settings(tmp_path, db_url, signing_key, broker, mqtt_reconnect_max_s=1)
    topics = Topics()
    devices = ("cam-a", "cam-b", "cam-c")
    with authed_client(create_app(settings)) as client:
        services = services_of(client)
        create_line(client)
        for d in devices:
            register(client, d)
        add_version(services, version=1, status="champion", champion_release=True)
        assert services.bridge is not None
        wait_for(services.bridge.connected.is_set, what="bridge connected")
        services.rollouts.publish_all_targets()
        wait_for(lambda: services.bridge.pending() == 0, what="targets published")

        broker.stop()
        (broker.workdir / "mosquitto.db").unlink(missing_ok=True)  # its state is gone
        broker.start()
        wait_for(lambda: services.bridge.stats.sessions_lost == 1, timeout=30, what="reconnect")

        got: dict[str, TargetMessage] = {}
        lock = threading.Lock()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

        def on_message(_c, _u, msg) -> None:
            parsed = topics.parse(msg.topic)
            assert parsed is not None  # retained, or live if the announcement comes later
            with lock:
                got[parsed[0]] = TargetMessage.from_dict(msg.payload)

        sub.on_message = on_message
        sub.connect(broker.host, broker.port)
        sub.subscribe(f"{topics.prefix}/devices/+/target", qos=1)
        sub.loop_start()
        try:
            wait_for(lambda: set(got) == set(devices), timeout=30, what="retained targets")
            assert {m.model_line for m in got.values()} == {"digits"}
        finally:
            sub.loop_stop()
            sub.disconnect()
