"""End to end on real parts: Mosquitto, the server process, and an agent process.

The agent (``edgeloop-agent run``) installs the factory model over HTTP, then receives a newly
trained, signed model over MQTT through an approved rollout, swaps it and reports back. Then an
attacker who controls the broker and a mirror tries two things, and the agent refuses both while
it keeps serving the model it has:
- a manifest signed by another key;
- a genuine manifest whose artifact bytes (served by a hostile mirror) do not match it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import (
    ArtifactRef,
    DeviceState,
    InputSpec,
    Manifest,
    StatusReport,
    TargetMessage,
    Topics,
    load_private_key,
)
from server.db.job_queue import ACTIVE_JOB_STATES  # queued, running, trained: not done yet
from tests.conftest import poll
from training.data import digits_pools

pytestmark = pytest.mark.slow
DEVICE = "e2e-0001"


class StatusListener:
    """Subscribes to the device's status topic like the server does, and keeps every report."""

    def __init__(self, host: str, port: int) -> None:
        self.reports: queue.Queue[StatusReport] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-listener")
        self.client.on_message = lambda c, u, m: self.reports.put(StatusReport.from_dict(m.payload))
        self.client.connect(host, port)
        self.client.subscribe(Topics().status(DEVICE), qos=1)
        self.client.loop_start()

    def wait_for(self, pred: Callable[[StatusReport], bool], timeout: float = 60) -> StatusReport:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = self.reports.get(timeout=0.5)
            except queue.Empty:
                continue
            if pred(r):
                return r
        raise AssertionError("no matching status report")

    def publish_target(self, msg: TargetMessage) -> None:
        info = self.client.publish(Topics().target(DEVICE), msg.to_json(), qos=1, retain=True)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class HostileMirror:
    """An HTTP server that serves whatever bytes the attacker wants under any path."""

    def __init__(self, body: bytes) -> None:
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                mirror.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.hits = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.onnx"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def agent_proc(server, broker, workdir) -> Iterator[tuple[subprocess.Popen[str], str]]:
    cfg = {
        "device_id": DEVICE,
        "model_line": "digits",
        "server_url": server.url,
        "mqtt_host": broker.host,
        "mqtt_port": broker.port,
        "state_dir": str(workdir / "agent"),
        "trusted_root_file": str(server.root_path),
        "metrics_interval_s": 0.5,
        "upload_interval_s": 0.5,
    }
    poll("the factory model", lambda: server.root_path.exists(), timeout=120)
    cfg["bootstrap_token"] = server.enrollment_token(max_uses=1)  # one-time: enrolls once
    path = workdir / "agent.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_agent.cli",
            "run",
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=open(workdir / "agent.log", "w"),  # noqa: SIM115
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    assert "listening on" in line, f"agent did not start: {line!r}"
    url = line.strip().rsplit(" ", 1)[-1]
    yield proc, url
    proc.terminate()
    proc.wait(20)


def test_agent_process_installs_signed_model_over_mqtt_and_refuses_attacks(
    server, broker, agent_proc, workdir
):
    proc, agent_url = agent_proc
    api = f"{server.url}/api/v1"
    H = server.headers  # the admin operator
    listener = StatusListener(broker.host, broker.port)
    try:
        # 1. The factory model (v1, release 1) arrives over the HTTP fallback and serves.
        status = poll(
            "agent serving v1",
            lambda: (s := httpx.get(f"{agent_url}/status").json())["model_version"] and s,
        )
        assert status["model_version"] == 1

        pools = digits_pools()

        def predict(x: np.ndarray) -> dict[str, Any]:
            r = httpx.post(f"{agent_url}/predict", json={"input": x.tolist()})
            assert r.status_code == 200, r.text
            return r.json()

        assert predict(pools.golden.X[0])["model_version"] == 1

        # 2. A challenger is trained (manual trigger), gated and signed; an operator approves.
        job = httpx.post(f"{api}/training-jobs", json={"model_line": "digits"}, headers=H).json()
        job = poll(
            "training job",
            lambda: (
                (j := httpx.get(f"{api}/training-jobs/{job['id']}", headers=H).json())["status"]
                not in ACTIVE_JOB_STATES
                and j
            ),
        )
        assert job["status"] == "succeeded", job
        rollout = poll(
            "rollout pending approval",
            lambda: next(
                (
                    r
                    for r in httpx.get(f"{api}/rollouts", headers=H).json()
                    if r["state"] == "pending_approval"
                ),
                None,
            ),
        )
        r = httpx.post(f"{api}/rollouts/{rollout['id']}/approve", json={}, headers=H)
        assert r.status_code == 200, r.text

        # 3. The agent receives the target over MQTT, swaps, and reports back.
        report = listener.wait_for(
            lambda s: (
                s.state in (DeviceState.INSTALLED, DeviceState.COMMITTED)
                and s.model_version == rollout["to_version"]
            )
        )
        assert report.rollout_id == rollout["id"]
        assert predict(pools.golden.X[1])["model_version"] == rollout["to_version"]
        # Labelled traffic feeds the live metrics that gate the rollout.
        for i in range(60):
            p = predict(pools.field.X[i])
            httpx.post(
                f"{agent_url}/feedback",
                json={"prediction_id": p["prediction_id"], "true_label": int(pools.field.y[i])},
            )
        device = poll(
            "server sees the device on the new model",
            lambda: (
                (d := httpx.get(f"{api}/devices/{DEVICE}", headers=H).json())["model_version"]
                == rollout["to_version"]
                and d
            ),
        )
        # The device is in probation until its labelled traffic commits it, and status reports
        # are written in batches: the first record that shows the new version may already say
        # probation (a later report of the device landed before the poll looked).
        assert device["state"] in ("installed", "probation", "committed"), device
        done = poll(
            "rollout completed",
            lambda: (
                (x := httpx.get(f"{api}/rollouts/{rollout['id']}", headers=H).json())["state"]
                in ("completed", "rolled_back")
                and x
            ),
        )
        assert done["state"] == "completed", done
        serving = httpx.get(f"{agent_url}/status").json()
        good_version, good_release = serving["model_version"], serving["release"]

        # 4. Forged manifest: signed by a key the device does not trust.
        now = datetime.now(UTC)
        forged_model = b"not a model at all" * 100
        # What the genuine manifest promises: bytes the device never held, of the same length as
        # what the hostile mirror serves, so that only the sha256 check can tell them apart.
        promised = os.urandom(len(forged_model))

        def manifest(release: int, body: bytes) -> Manifest:
            return Manifest(
                model_line="digits",
                release=release,
                model_version=99,
                artifact=ArtifactRef("model.onnx", hashlib.sha256(body).hexdigest(), len(body)),
                input_spec=InputSpec("input", (-1, 64), "float32", 0.0, 1.0),
                labels=tuple(str(i) for i in range(10)),
                created_at=now,
                expires_at=now + timedelta(days=1),
            )

        mirror = HostileMirror(forged_model)
        try:
            attacker = Ed25519PrivateKey.generate()
            forged = manifest(good_release + 5, forged_model).sign([attacker])
            listener.publish_target(TargetMessage("digits", forged.to_dict(), mirror.url))
            refused = listener.wait_for(lambda s: s.state == DeviceState.REFUSED)
            assert "signature" in (refused.reason or "").lower()
            assert mirror.hits == 0, (
                "the agent must not download anything for an untrusted manifest"
            )

            # 5. Genuine key, but the mirror serves bytes that do not match the signed hash.
            real_key = load_private_key((server.data_dir / "keys" / "signing.pem").read_bytes())
            genuine = manifest(good_release + 6, promised).sign([real_key])
            listener.publish_target(TargetMessage("digits", genuine.to_dict(), mirror.url))
            refused = listener.wait_for(lambda s: s.state == DeviceState.REFUSED)
            assert mirror.hits >= 1
            assert any(w in (refused.reason or "").lower() for w in ("sha256", "hash"))
        finally:
            mirror.close()

        # The agent kept serving its good model throughout, and never moved its version floor.
        after = httpx.get(f"{agent_url}/status").json()
        assert after["model_version"] == good_version
        assert after["highest_release"] == good_release
        assert predict(pools.golden.X[2])["model_version"] == good_version
        assert proc.poll() is None
    finally:
        listener.close()
