"""Several server processes share the device reports through an MQTT 5 shared subscription."""

from __future__ import annotations

import queue
import time

import paho.mqtt.client as mqtt

from contract import DeviceState, StatusReport, Topics
from server.fleet.mqtt_bridge import MqttBridge


def drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def publish_reports(broker, n: int) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    topics = Topics()
    infos = [
        c.publish(
            topics.status(f"dev-{i}"),
            StatusReport(f"dev-{i}", 1.0, DeviceState.IDLE, "digits", 1, 1).to_json(),
            qos=1,
        )
        for i in range(n)
    ]
    for info in infos:
        info.wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


def collect(queues: list[queue.Queue], want: int, settle_s: float = 1.0) -> list[list]:
    """Wait until ``want`` items arrived in total, then a little longer to catch duplicates."""
    got: list[list] = [[] for _ in queues]
    deadline = time.monotonic() + 30
    while sum(map(len, got)) < want and time.monotonic() < deadline:
        for g, q in zip(got, queues, strict=True):
            g.extend(drain(q))
        time.sleep(0.05)
    time.sleep(settle_s)
    for g, q in zip(got, queues, strict=True):
        g.extend(drain(q))
    return got


def bridges(broker, group: str | None) -> tuple[list[MqttBridge], list[queue.Queue]]:
    qs: list[queue.Queue] = [queue.Queue(), queue.Queue()]
    bs = [
        MqttBridge(host=broker.host, port=broker.port, ingest_queue=q, shared_group=group)
        for q in qs
    ]
    for b in bs:
        b.start()
    deadline = time.monotonic() + 10
    while not all(b.connected.is_set() for b in bs) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # subscriptions are sent right after CONNACK
    return bs, qs


def test_two_servers_in_one_group_split_the_reports(broker):
    bs, qs = bridges(broker, "edgeloop-server")
    try:
        publish_reports(broker, 200)
        a, b = collect(qs, 200)
        assert len(a) + len(b) == 200, "each report must reach exactly one server"
        assert a and b, "the broker should spread reports over both servers"
        assert {x[1] for x in a}.isdisjoint({x[1] for x in b})
    finally:
        for br in bs:
            br.stop()


def test_without_a_group_every_server_gets_every_report(broker):
    bs, qs = bridges(broker, None)
    try:
        publish_reports(broker, 50)
        a, b = collect(qs, 100)
        assert len(a) == 50 and len(b) == 50
    finally:
        for br in bs:
            br.stop()
