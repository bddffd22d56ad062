"""The whole Agent with real Mosquitto, a real local HTTP server and real ONNX Runtime."""

from __future__ import annotations

import json
import queue
import threading
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from contract.messages import DeviceState, MetricsReport, StatusReport
from contract.topics import Topics
from device_agent import Agent, NoModelError
from tests.device_agent.agent_testkit import (
    FEATURES,
    FakeServer,
    make_config,
    make_manifest,
    make_model,
    make_target,
    reference_probs,
    wait_until,
)

TOPICS = Topics()


class Observer:
    """A plain paho client: publishes retained targets, collects status and metrics."""

    def __init__(self, host: str, port: int) -> None:
        self.status: queue.Queue[StatusReport] = queue.Queue()
        self.metrics: queue.Queue[MetricsReport] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe([(TOPICS.all_status, 1), (TOPICS.all_metrics, 0)])
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/status"):
            self.status.put(StatusReport.from_dict(json.loads(msg.payload)))
        elif msg.topic.endswith("/metrics"):
            self.metrics.put(MetricsReport.from_dict(json.loads(msg.payload)))

    def publish_target(self, device_id: str, payload: bytes) -> None:
        self.client.publish(TOPICS.target(device_id), payload, qos=1, retain=True).wait_for_publish(
            10
        )

    def wait_status(self, pred, timeout: float = 60.0) -> StatusReport:
        return _wait_queue(self.status, pred, timeout)

    def wait_metrics(self, pred, timeout: float = 60.0) -> MetricsReport:
        return _wait_queue(self.metrics, pred, timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _wait_queue(q: queue.Queue, pred, timeout: float):
    seen = []
    deadline_rounds = int(timeout / 0.1)
    for _ in range(deadline_rounds):
        try:
            item = q.get(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(item)
        if pred(item):
            return item
    raise AssertionError(f"no matching message; saw {seen}")


@pytest.fixture
def observer(broker):
    obs = Observer(broker.host, broker.port)
    yield obs
    obs.close()


def test_agent_installs_retained_target_and_reports(
    broker, observer: Observer, fake_server: FakeServer, tmp_path, signing_key
) -> None:
    m1 = make_model(1)
    manifest = make_manifest(m1, release=1, model_version=1)
    target = make_target(manifest, signing_key, fake_server.add("m1.onnx", m1), rollout_id=42)
    observer.publish_target("dev-1", target.to_json())  # retained, before the device connects
    cfg = make_config(
        tmp_path / "state",
        signing_key,
        server_url=fake_server.url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
    )
    agent = Agent(cfg)
    agent.start()
    try:
        with pytest.raises(NoModelError):
            agent.predict(np.zeros(FEATURES, dtype=np.float32))
        assert agent.wait_ready(60)
        installed = observer.wait_status(lambda s: s.state == DeviceState.INSTALLED)
        assert (installed.device_id, installed.model_version, installed.rollout_id) == (
            "dev-1",
            1,
            42,
        )
        observer.wait_status(lambda s: s.state == DeviceState.COMMITTED)
        x = np.random.default_rng(3).uniform(0, 16, FEATURES).astype(np.float32)
        p = agent.predict(x)
        assert p.model_version == 1 and p.label == int(np.argmax(reference_probs(1, x)))
        agent.feedback(p.prediction_id, (p.label + 1) % 10)  # wrong: captured and uploaded
        report = observer.wait_metrics(lambda r: r.inferences >= 1 and r.labelled >= 1)
        assert (report.model_version, report.rollout_id, report.correct) == (1, 42, 0)
        wait_until(lambda: len(fake_server.acked_ids) == 1)
        wait_until(lambda: fake_server.registrations)
        assert fake_server.registrations[0] == {
            "device_id": "dev-1",
            "model_line": "digits",
            "hardware": "generic",  # the default hardware class
            "agent_version": cfg.agent_version,
            "groups": [],  # its configured groups (none here)
        }
        status = agent.status()
        assert status["model_version"] == 1 and status["release"] == 1
        assert status["state"] == "committed" and status["spool"]["uploaded"] == 1
        assert status["mqtt_connected"] and status["registered"]

        # A second release over MQTT hot-swaps; a replayed older one is refused.
        m2 = make_model(2)
        t2 = make_target(
            make_manifest(m2, release=2, model_version=2),
            signing_key,
            fake_server.add("m2.onnx", m2),
            rollout_id=43,
        )
        observer.publish_target("dev-1", t2.to_json())
        observer.wait_status(lambda s: s.state == DeviceState.COMMITTED and s.model_version == 2)
        assert agent.predict(x).model_version == 2
        observer.publish_target("dev-1", target.to_json())
        refused = observer.wait_status(lambda s: s.state == DeviceState.REFUSED)
        assert refused.reason is not None
        assert refused.reason.startswith("RollbackRefusedError")
        assert agent.predict(x).model_version == 2
    finally:
        agent.stop()

    # Persisted: a new agent on the same state_dir serves at start, with no network at all.
    offline = Agent(make_config(tmp_path / "state", signing_key))
    try:
        offline.start()
        assert offline.wait_ready(10)
        assert offline.predict(x).model_version == 2
        assert offline.status()["highest_release"] == 2
    finally:
        offline.stop()


def test_http_fallback_installs_without_mqtt(
    fake_server: FakeServer, tmp_path, signing_key
) -> None:
    m1 = make_model(1)
    target = make_target(
        make_manifest(m1, release=1, model_version=1), signing_key, fake_server.add("m1.onnx", m1)
    )
    cfg = make_config(tmp_path / "state", signing_key, server_url=fake_server.url)
    agent = Agent(cfg)  # mqtt_port 9: no broker reachable
    agent.start()
    try:
        wait_until(lambda: fake_server.registrations)
        fake_server.target = target.to_json()  # the server learns of a target after registration
        assert agent.wait_ready(60)
        assert agent.predict(np.zeros(FEATURES, dtype=np.float32)).model_version == 1
    finally:
        agent.stop()


def test_server_unreachable_never_blocks_serving(tmp_path, signing_key) -> None:
    agent = Agent(make_config(tmp_path / "state", signing_key))
    agent.start()  # returns at once although neither server nor broker answers
    try:
        assert not agent.wait_ready(0.2)
        assert agent.status()["serving"] is False
    finally:
        agent.stop()


def test_many_agents_in_one_process(
    broker, observer: Observer, fake_server: FakeServer, tmp_path, signing_key
) -> None:
    m1 = make_model(1)
    target = make_target(
        make_manifest(m1, release=1, model_version=1), signing_key, fake_server.add("m1.onnx", m1)
    )
    agents = []
    for i in range(6):
        cfg = make_config(
            tmp_path / f"d{i}",
            signing_key,
            device_id=f"dev-{i}",
            server_url=fake_server.url,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
        )
        observer.publish_target(cfg.device_id, target.to_json())
        agents.append(Agent(cfg))
    try:
        for a in agents:
            a.start()
        for a in agents:
            assert a.wait_ready(60)
            assert a.predict(np.zeros(FEATURES, dtype=np.float32)).model_version == 1
    finally:
        for a in agents:
            a.stop()
