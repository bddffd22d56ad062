"""Label-free monitoring on the device: the agent bins every inference of a model that ships a
monitoring reference, publishes one summary per period that the contract parses back, keeps the
summaries in its outbox while the broker is away, and serves a model without a reference (or
with a broken one) exactly as before."""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from contract.monitoring import METADATA_KEY, MonitoringReference, MonitorSummary
from contract.topics import Topics
from device_agent import Agent
from device_agent.monitor import Monitor
from device_agent.runtime import Loaded, ModelRuntime, classify
from device_agent.store import InstallRecord, ModelStore, PersistedState
from tests.device_agent.agent_testkit import (
    CLASSES,
    FEATURES,
    make_config,
    make_manifest,
    make_model,
    wait_until,
)
from training.export import add_metadata, onnx_predict_proba
from training.monitoring import build_reference, embed_reference

TOPICS = Topics()


def reference_for(data: bytes, seed: int = 0) -> MonitoringReference:
    """What training would ship for the testkit model (inputs in 0..16, as its manifest says)."""
    rng = np.random.default_rng(seed)
    return build_reference(
        lambda X: onnx_predict_proba(data, X),
        rng.uniform(0, 16, (400, FEATURES)).astype(np.float32),
        rng.uniform(0, 16, (200, FEATURES)).astype(np.float32),
        rng.integers(0, CLASSES, 200),
        n_classes=CLASSES,
        value_range=(0.0, 16.0),
    )


def monitored_model(seed: int) -> tuple[bytes, MonitoringReference]:
    data = make_model(seed)
    ref = reference_for(data, seed)
    return embed_reference(data, ref), ref


def load(tmp_path: Path, data: bytes, version: int) -> Loaded:
    path = tmp_path / f"m{version}.onnx"
    path.write_bytes(data)
    return ModelRuntime().load(path, make_manifest(data, release=version, model_version=version))


def serve(monitor: Monitor, loaded: Loaded, X: np.ndarray) -> np.ndarray:
    """Classify each row as the agent does and hand it to the monitor; the probabilities."""
    probs = []
    for x in X:
        raw = classify(loaded, x)
        monitor.observe(loaded, x, raw.probabilities)
        probs.append(raw.probabilities.copy())
    return np.asarray(probs)


def test_summaries_round_trip_and_count_what_the_reference_function_counts(
    tmp_path: Path,
) -> None:
    data, ref = monitored_model(1)
    loaded = load(tmp_path, data, 1)
    assert loaded.monitoring == ref  # read from the signed bytes' metadata at load
    now = [1_000.0]
    monitor = Monitor(device_id="dev-1", model_line="digits", clock=lambda: now[0])
    X = np.random.default_rng(5).uniform(0, 16, (1300, FEATURES)).astype(np.float32)
    P = serve(monitor, loaded, X)  # 1,300 rows: the buffer fills and bins on its own, twice
    monitor.flush()
    now[0] = 1_060.0
    (summary,) = monitor.snapshot_and_reset(serving_sha256=loaded.sha256, release=4)
    assert (summary.samples, summary.release, summary.start, summary.end) == (1300, 4, 1000, 1060)
    payload = summary.to_json()
    assert len(payload) < 2048
    back = MonitorSummary.from_dict(payload)
    assert back == summary
    back.check_against(ref)
    expected = ref.histogram(X, P)
    assert {k: list(v) for k, v in back.counts} == {k: v.tolist() for k, v in expected.items()}
    assert monitor.snapshot_and_reset() == []  # a period without inferences sends nothing


def test_a_swap_mid_period_gives_one_summary_per_model(tmp_path: Path) -> None:
    (a, _), (b, _) = monitored_model(1), monitored_model(2)
    old, new = load(tmp_path, a, 1), load(tmp_path, b, 2)
    monitor = Monitor(device_id="dev-1", model_line="digits", clock=lambda: 5.0)
    X = np.random.default_rng(0).uniform(0, 16, (30, FEATURES)).astype(np.float32)
    serve(monitor, old, X[:10])
    serve(monitor, new, X[10:])
    summaries = monitor.snapshot_and_reset(serving_sha256=new.sha256, release=2)
    assert [(s.model_version, s.samples, s.release) for s in summaries] == [
        (1, 10, None),
        (2, 20, 2),
    ]


def test_a_model_without_a_reference_is_served_unmonitored(tmp_path: Path) -> None:
    loaded = load(tmp_path, make_model(3), 1)
    assert loaded.monitoring is None
    monitor = Monitor(device_id="dev-1", model_line="digits", clock=lambda: 0.0)
    serve(monitor, loaded, np.ones((5, FEATURES), np.float32))
    assert monitor.pending == 0 and monitor.snapshot_and_reset() == []


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("{not json", "not JSON"),
        (json.dumps({"v": 99}), "format 99"),
        ("wrong-shape", "input values"),
    ],
)
def test_a_broken_reference_turns_monitoring_off_not_the_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reference: str, reason: str
) -> None:
    data = make_model(4)
    if reference == "wrong-shape":  # a reference made for 32 input values
        ref = reference_for(data)
        reference = json.loads(ref.to_json()) | {"features": 32}
        reference["pca"]["features"] = 32
        reference["pca"]["k"] = 1
        mean = np.zeros(32, np.float32)
        from contract.messages import encode_input

        reference["pca"]["mean"] = encode_input(mean)
        reference["pca"]["components"] = encode_input(mean + 1)
        reference["signals"] = [s for s in reference["signals"] if s["name"][:2] != "pc"]
        reference["signals"].append({"name": "pc0", "edges": [0.0], "counts": [1, 1]})
        reference = json.dumps(reference)
    with caplog.at_level(logging.WARNING, logger="device_agent.monitor"):
        loaded = load(tmp_path, add_metadata(data, {METADATA_KEY: reference}), 1)
    assert loaded.monitoring is None
    assert reason in caplog.text and "monitoring off" in caplog.text
    assert classify(loaded, np.ones(FEATURES, np.float32)).label in range(CLASSES)


def install(state_dir: Path, key, data: bytes, version: int = 1) -> None:  # noqa: ANN001
    """What an agent resumes at start: ``data`` signed and installed in the current slot."""
    manifest = make_manifest(data, release=version, model_version=version)
    store = ModelStore(state_dir)
    store.model_path(manifest.artifact.sha256).write_bytes(data)
    store.save_state(
        PersistedState(
            current=InstallRecord(
                envelope=manifest.sign([key]).to_dict(),
                sha256=manifest.artifact.sha256,
                model_version=version,
                release=version,
            ),
            highest_release=version,
        )
    )


class Listener:
    """A plain paho client collecting what devices publish on the monitor topics."""

    def __init__(self, host: str, port: int) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"l-{uuid.uuid4().hex}")
        self.client.on_message = lambda c, u, msg: self.got.put((msg.topic, msg.payload))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(TOPICS.all_monitor, qos=1)
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_agent_keeps_summaries_while_offline_and_delivers_them(
    tmp_path: Path, signing_key, broker
) -> None:
    """A real agent and a real Mosquitto that is down while the device serves: the periods'
    summaries wait in the outbox (on disk), then arrive on the monitor topic at QoS 1, parse,
    and account for every inference."""
    data, ref = monitored_model(7)
    state = tmp_path / "state"
    install(state, signing_key, data)
    broker.stop()
    cfg = make_config(
        state,
        signing_key,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        monitor_interval_s=0.3,
        bootstrap_token="",  # anonymous broker: MQTT starts at once, no enrollment
    )
    agent = Agent(cfg)
    agent.start()
    listener = None
    try:
        assert agent.wait_ready(30)
        X = np.random.default_rng(2).uniform(0, 16, (120, FEATURES)).astype(np.float32)
        for x in X[:60]:
            agent.predict(x)
        monitor_topic = TOPICS.monitor(cfg.device_id)
        wait_until(
            lambda: any(t == monitor_topic for t, _, _ in list(agent._outbox._items)), timeout=30
        )
        assert agent.status()["monitor"]["enabled"]
        assert monitor_topic.encode() in (state / "outbox.jsonl").read_bytes()  # on disk
        broker.start()
        listener = Listener(broker.host, broker.port)
        for x in X[60:]:
            agent.predict(x)
        received: list[MonitorSummary] = []

        def all_counted() -> bool:
            while not listener.got.empty():
                topic, payload = listener.got.get()
                assert topic == monitor_topic
                received.append(MonitorSummary.from_dict(payload))
            return sum(s.samples for s in received) == len(X)

        wait_until(all_counted, timeout=60)
        for s in received:
            s.check_against(ref)
            assert (s.device_id, s.model_version, s.release) == (cfg.device_id, 1, 1)
        assert agent.status()["outbox"]["dropped"] == 0
    finally:
        agent.stop()
        if listener is not None:
            listener.close()


def test_agent_serving_a_model_without_reference_sends_no_summaries(
    tmp_path: Path, signing_key
) -> None:
    state = tmp_path / "state"
    install(state, signing_key, make_model(8))
    agent = Agent(make_config(state, signing_key, monitor_interval_s=0.1))
    assert agent.resume()
    for _ in range(20):
        agent.predict(np.ones(FEATURES, np.float32))
    agent._publish_monitor()  # what the metrics thread does at the end of a period
    assert len(agent._outbox) == 0
    st = agent.status()
    assert st["monitor"] == {"enabled": False, "pending": 0, "summaries": 0}
    assert st["inferences"] == 20
