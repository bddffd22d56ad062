"""Real fleets for rollout tests: Mosquitto, the server process, real agents, a target recorder.

The line's offline gate is relaxed on purpose (its config is the bootstrap config), so that a
model trained on flipped labels is signed and reaches the rollout: the on-device quality gates
must be what stops it. The agents' own probation is made lenient for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from contract import TargetMessage, Topics, encode_input
from device_agent import AgentConfig
from device_agent.identity import load_credential
from firmware_sim.fleet import Fleet, FleetConfig, Inputs
from firmware_sim.services import Mosquitto, ServerProcess
from server.db.job_queue import ACTIVE_JOB_STATES  # queued, running, trained: not done yet
from tests.conftest import TEST_ADMIN_TOKEN, auth_headers, poll
from training.data import digits_pools

RELAXED_LINE = {
    "trainer": "sklearn-mlp",
    "gate": {
        "max_golden_drop": 1.0,
        "min_field_gain": -1.0,
        "max_macro_f1_drop": 1.0,
        "max_class_recall_drop": 1.0,
        "max_class_precision_drop": 1.0,
        "max_ece_increase": 1.0,
    },
}
# The agent commits on probation without judging accuracy (fields that exist are applied).
LENIENT_PROBATION = {
    "probation_min_labelled": 20,
    "probation_max_s": 20.0,
    "probation_max_accuracy_drop": 1.0,
    "probation_max_error_rate_increase": 1.0,
    "probation_max_latency_ratio": 100.0,
}
SERVER_ENV = {
    "EDGELOOP_BOOTSTRAP_LINE": "digits",
    "EDGELOOP_AUTO_ROLLOUT": "false",
    "EDGELOOP_RETRAIN_THRESHOLD": "1000000",
    "EDGELOOP_ROLLOUT_TICK_S": "0.5",
    "EDGELOOP_MIN_LABELLED": "40",
    "EDGELOOP_MAX_ACCURACY_DROP": "0.15",
    "EDGELOOP_CANARY_MIN_SOAK_S": "1",
    "EDGELOOP_WAVE_SUCCESS_PCT": "100",
    "EDGELOOP_INSTALL_TIMEOUT_S": "90",
    "EDGELOOP_ROLLOUT_RETRY_BACKOFF_S": "2",
    # The poisoning guard's label screening would quarantine the flipped labels before they
    # reach a dataset; off here, so the flipped model is trained and the rollout gates meet it.
    "EDGELOOP_SCREEN_LABELS": "false",
}


class TargetRecorder:
    """Every target message the broker delivers, per device: (release, model_version, rollout)."""

    def __init__(self, host: str, port: int) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, list[tuple[int, int, int | None]]] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="target-recorder")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(
            Topics().target("+"), qos=1
        )
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        device = m.topic.split("/")[-2]
        msg = TargetMessage.from_dict(json.loads(m.payload))
        import base64

        payload = json.loads(base64.b64decode(msg.envelope["payload"]))
        with self.lock:
            self.seen.setdefault(device, []).append(
                (int(payload["release"]), int(payload["model_version"]), msg.rollout_id)
            )

    def versions(self, device: str) -> set[int]:
        with self.lock:
            return {v for _, v, _ in self.seen.get(device, [])}

    def count(self, device: str, version: int) -> int:
        with self.lock:
            return sum(1 for _, v, _ in self.seen.get(device, []) if v == version)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class LenientFleet(Fleet):
    def agent_config(self, index: int) -> AgentConfig:
        cfg = super().agent_config(index)
        known = {f.name for f in dataclasses.fields(cfg)}
        return dataclasses.replace(
            cfg, **{k: v for k, v in LENIENT_PROBATION.items() if k in known}
        )


class World:
    """The server, the broker, fleets and helpers to drive the API."""

    def __init__(self, broker: Mosquitto, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        config = workdir / "line.json"
        config.write_text(json.dumps(RELAXED_LINE))
        self.server = ServerProcess(
            workdir / "server",
            mqtt_port=broker.port,
            env={
                **SERVER_ENV,
                "EDGELOOP_BOOTSTRAP_CONFIG": str(config),
                "EDGELOOP_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
            },
        ).start()
        self.headers = auth_headers(TEST_ADMIN_TOKEN)  # the admin operator
        self.api = f"{self.server.url}/api/v1"
        self.recorder = TargetRecorder(broker.host, broker.port)
        self.fleets: list[Fleet] = []
        self.inputs = Inputs.build(severity=0.0)

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.api}{path}", params=params, headers=self.headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def post(
        self,
        path: str,
        body: Any = None,
        expect: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Any:
        r = httpx.post(f"{self.api}{path}", json=body, headers=headers or self.headers, timeout=60)
        assert r.status_code == expect, r.text
        return r.json()

    def start_fleet(self, n: int, prefix: str = "sim", rate_hz: float = 6.0) -> Fleet:
        poll("the factory model", lambda: self.server.root_path.exists(), timeout=180)
        poll(
            "a champion",
            lambda: self.get("/model-lines/digits").get("champion_version") is not None,
            timeout=180,
            every=1.0,
        )
        fleet = LenientFleet(
            FleetConfig(
                server_url=self.server.url,
                mqtt_host=self.broker.host,
                mqtt_port=self.broker.port,
                trusted_keys=[],
                trusted_root=self.server.root_path.read_bytes(),
                state_root=self.workdir / f"fleet-{prefix}",
                devices=n,
                id_prefix=prefix,
                metrics_interval_s=0.5,
                upload_interval_s=5.0,
                bootstrap_token=self.server.enrollment_token(max_uses=n),
            ),
            inputs=self.inputs,
        )
        fleet.start()
        assert fleet.wait_ready(120), "agents did not get the factory model"
        fleet.start_traffic(rate_hz)
        self.fleets.append(fleet)
        return fleet

    def train(self, *, flipped: bool = False) -> int:
        """A new version through the real training path; returns its number."""
        if flipped:
            self.upload_flipped_samples()
        job = self.post("/training-jobs", {"model_line": "digits"}, expect=201)
        done = poll(
            "the training job",
            lambda: (
                (j := self.get(f"/training-jobs/{job['id']}"))["status"] not in ACTIVE_JOB_STATES
                and j
            ),
            timeout=240,
            every=1.0,
        )
        assert done["status"] == "succeeded", done
        return int(done["result_version"])

    def upload_flipped_samples(self) -> None:
        """Every input the devices see (the field pool) and the base training inputs, each
        labelled (truth + 1) mod 10: the model learns the wrong digit for what devices see."""
        pools = digits_pools()
        sim = self.fleets[0].devices[0]
        device = sim.device_id
        # Uploaded as that device, with its own credential (a device speaks only for itself).
        credential = load_credential(sim.agent.config)
        assert credential, f"{device} is not enrolled"
        samples = []
        for name, split in (("field", pools.field), ("train", pools.train)):
            for i, (x, y) in enumerate(zip(split.X, split.y, strict=True)):
                samples.append(
                    {
                        "sample_id": f"flip-{name}-{i}",
                        "device_id": device,
                        "model_line": "digits",
                        "model_version": 1,
                        "input_b64": encode_input(x),
                        "true_label": int((y + 1) % 10),
                        "predicted_label": int(y),
                        "confidence": 0.9,
                        "captured_at": time.time(),
                    }
                )
        accepted = 0
        for start in range(0, len(samples), 500):
            batch = {"samples": samples[start : start + 500]}
            accepted += self.post("/samples", batch, headers=auth_headers(credential))["accepted"]
        assert accepted > len(samples) // 2, accepted

    def create_rollout(self, version: int, waves: list[dict[str, Any]]) -> int:
        r = self.post(
            "/rollouts",
            {"model_line": "digits", "model_version": version, "waves": waves},
            expect=201,
        )
        return int(r["id"])

    def wait_rollout(self, rid: int, states: tuple[str, ...], timeout: float = 150) -> Any:
        return poll(
            f"rollout {rid} in {states}",
            lambda: (r := self.get(f"/rollouts/{rid}"))["state"] in states and r,
            timeout=timeout,
        )

    def devices(self) -> list[str]:
        return [d.device_id for f in self.fleets for d in f.devices]

    def serving(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for f in self.fleets:
            out.update(f.versions())
        return out

    def close(self) -> None:
        for f in self.fleets:
            f.stop()
        self.recorder.close()
        self.server.stop()


@pytest.fixture
def world(broker: Mosquitto, workdir: Path) -> Iterator[World]:
    w = World(broker, workdir)
    try:
        yield w
    finally:
        w.close()
