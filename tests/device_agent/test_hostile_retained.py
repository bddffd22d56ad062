"""Issue 12, done when: no retained message can stop a device from updating.

Real parts throughout: Mosquitto, the edgeloop server process, and the agent process
(``edgeloop-agent run``). An attacker with nothing but a plain MQTT client publishes, retained,
each kind of hostile message to the agent's target topic; each one is refused, and each refusal
shows in the server's device API (``GET /api/v1/devices/{id}/events``). Then the agent restarts
into the last hostile message (still retained), stays healthy, and the next genuine signed
release is installed as any release is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import TargetMessage, Topics, load_private_key
from contract.manifest import Targeting
from contract.messages import MAX_TARGET_BYTES
from tests.conftest import poll
from tests.device_agent.agent_testkit import FakeServer, make_manifest, make_model
from tests.device_agent.hostile_kit import nested

pytestmark = pytest.mark.slow
DEVICE = "hostile-0001"
INSTALL_TIMEOUT_S = 90.0  # the bound every install in these end-to-end tests gets


class AgentProcess:
    """``edgeloop-agent run`` in a subprocess; ``restart`` keeps its state directory."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent.cli", "run", "--config", str(self.config)]
            + ["--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=open(self.log, "a"),  # noqa: SIM115 - handed to the child
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert "listening on" in line, f"agent did not start: {line!r}"
        self.url = line.strip().rsplit(" ", 1)[-1]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10)

    def status(self) -> dict[str, Any]:
        return self.get("/status").json()


@pytest.fixture
def artifacts() -> Iterator[FakeServer]:
    srv = FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def agent(server, broker, workdir) -> Iterator[AgentProcess]:
    poll("the factory model", lambda: server.root_path.exists(), timeout=180)
    cfg = {
        "device_id": DEVICE,
        "model_line": "digits",
        "server_url": server.url,
        "mqtt_host": broker.host,
        "mqtt_port": broker.port,
        "state_dir": str(workdir / "agent"),
        "trusted_root_file": str(server.root_path),
        "bootstrap_token": server.enrollment_token(max_uses=1),
        "metrics_interval_s": 0.5,
        "probation_max_s": 0.0,  # commit at the first probation check
    }
    path = workdir / "agent.json"
    path.write_text(json.dumps(cfg))
    proc = AgentProcess(path, workdir / "agent.log").start()
    yield proc
    proc.stop()


class Attacker:
    """A plain MQTT client: publishes whatever it likes to the device's target topic, retained."""

    def __init__(self, host: str, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, payload: bytes) -> None:
        info = self.client.publish(Topics().target(DEVICE), payload, qos=1, retain=True)
        info.wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_retained_hostile_messages_never_stop_the_next_release(
    server, broker, agent: AgentProcess, artifacts: FakeServer, workdir: Path
) -> None:
    api, headers = f"{server.url}/api/v1", server.headers
    key = load_private_key((server.data_dir / "keys" / "signing.pem").read_bytes())

    def events(after: int) -> list[dict[str, Any]]:
        r = httpx.get(f"{api}/devices/{DEVICE}/events", params={"limit": 200}, headers=headers)
        assert r.status_code == 200, r.text
        return [e for e in r.json() if e["id"] > after]

    def last_event_id() -> int:
        return max((e["id"] for e in events(0)), default=0)

    def release(number: int, *, targeting: Targeting | None = None, signer=key) -> TargetMessage:
        data = make_model(100 + number)
        m = make_manifest(data, release=number, model_version=100 + number)
        if targeting is not None:
            m = replace(m, targeting=targeting)
        url = artifacts.add(f"r{number}", data)
        return TargetMessage("digits", m.sign([signer]).to_dict(), url)

    def install(t: TargetMessage, attacker: Attacker) -> None:
        """Publish a genuine release as the server would (retained) and wait for it to serve."""
        version = 100 + json.loads(_payload(t))["release"]
        attacker.publish(t.to_json())
        poll(
            f"model version {version} serving and committed",
            lambda: (s := agent.status())["model_version"] == version and s["state"] == "committed",
            timeout=INSTALL_TIMEOUT_S,
        )
        poll(
            "the server seeing it",
            lambda: (
                httpx.get(f"{api}/devices/{DEVICE}", headers=headers).json()["model_version"]
                == version
            ),
            timeout=60,
        )
        x = np.random.default_rng(0).uniform(0, 16, 64).tolist()
        r = httpx.post(f"{agent.url}/predict", json={"input": x}, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == version, r.text

    poll("the factory model serving", lambda: agent.status()["model_version"], timeout=180)
    first = agent.status()["highest_release"]
    # The server's own, genuine target for the factory release, as the device fetched it: what
    # an attacker records and replays once the device has moved on.
    credential = json.loads((workdir / "agent" / "credential.json").read_bytes())["credential"]
    old = httpx.get(
        f"{api}/devices/{DEVICE}/target", headers={"Authorization": f"Bearer {credential}"}
    )
    assert old.status_code == 200, old.text
    attacker = Attacker(broker.host, broker.port)
    try:
        # A genuine release first: the device's usual install, and a floor for the replay below.
        r2 = release(first + 1)
        install(r2, attacker)
        genuine = json.loads(r2.to_json())
        hostile: list[tuple[str, bytes, str]] = [
            ("non-JSON", b"\x00\x01 not json {", "not JSON"),
            ("truncated JSON", r2.to_json()[: len(r2.to_json()) // 2], "not JSON"),
            ("5 MB", b"[" + b" " * (5 * 1024 * 1024) + b"]", f"limit {MAX_TARGET_BYTES}"),
            (
                "wrong types",
                json.dumps({**genuine, "model_line": 7, "rollout_id": "1"}).encode(),
                "must be str",
            ),
            ("a list, not an object", json.dumps([genuine]).encode(), "must be a JSON object"),
            (
                "huge rollout_id",
                json.dumps({**genuine, "rollout_id": 10**40}).encode(),
                "rollout_id must be",
            ),
            (
                "forged signature",
                release(first + 5, signer=Ed25519PrivateKey.generate()).to_json(),
                "SignatureInvalidError",
            ),
            ("replayed old release", old.content, "RollbackRefusedError"),
            (
                "another device's target",
                release(first + 6, targeting=Targeting(device_ids=("other-0002",))).to_json(),
                "TargetingMismatchError",
            ),
            ("deep nesting", nested(200_000, "["), "levels deep"),  # stays retained
        ]
        for kind, payload, words in hostile:
            seen = last_event_id()
            attacker.publish(payload)
            refusal = poll(
                f"the refusal of the {kind} message in the device API",
                lambda seen=seen, words=words: _refusal(events(seen), words),
                timeout=60,
            )
            assert refusal["rollout_id"] is None, refusal
            assert agent.get("/healthz").status_code == 200, kind

        # Restart into the retained deep-nesting message: refused again, the agent stays up.
        seen = last_event_id()
        agent.stop()
        agent.start()
        poll(
            "the retained message refused after the restart",
            lambda: _refusal(events(seen), "levels deep"),
            timeout=60,
        )
        health = agent.get("/healthz")
        assert health.status_code == 200, health.text
        workers = agent.status()["workers"]
        assert all(w["state"] in ("running", "done") for w in workers.values()), workers
        assert all(w.get("restarts", 0) == 0 for w in workers.values()), workers

        # The next genuine release replaces the retained message and installs as usual.
        install(release(first + 7), attacker)
        assert agent.status()["highest_release"] == first + 7
    finally:
        attacker.close()


def _refusal(events: list[dict[str, Any]], words: str) -> dict[str, Any] | None:
    return next(
        (e for e in events if e["state"] == "refused" and words in (e["reason"] or "")), None
    )


def _payload(t: TargetMessage) -> bytes:
    import base64

    return base64.b64decode(t.envelope["payload"])
