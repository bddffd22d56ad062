"""The ``edgeloop-agent`` command as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.device_agent.agent_testkit import (
    FEATURES,
    FakeServer,
    Rig,
    make_manifest,
    make_model,
    make_target,
    public_pem,
)

AGENT = [sys.executable, "-m", "device_agent.cli"]


def write_config(tmp_path: Path, key, state_dir: Path) -> Path:
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / "signing.pub.pem").write_bytes(public_pem(key))
    cfg = {
        "device_id": "cli-1",
        "model_line": "digits",
        "server_url": "http://127.0.0.1:9",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": 9,
        "state_dir": str(state_dir),
        "trusted_key_files": ["keys/signing.pub.pem"],  # relative to the config file
        "metrics_interval_s": 0.5,
    }
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def installed_state(tmp_path, signing_key, fake_server: FakeServer) -> Path:
    state = tmp_path / "state"
    rig = Rig(state, signing_key)
    m1 = make_model(1)
    target = make_target(
        make_manifest(m1, release=1, model_version=1), signing_key, fake_server.add("m1.onnx", m1)
    )
    assert rig.updater.handle_target(target).value == "committed"
    rig.close()
    return state


def start_agent(config: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*AGENT, "run", "--config", str(config), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.startswith("edgeloop-agent listening on http://"), line
    return proc, line.strip().rsplit(" ", 1)[-1]


def stop_agent(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_run_serves_predict_feedback_status(tmp_path, signing_key, installed_state) -> None:
    proc, url = start_agent(write_config(tmp_path, signing_key, installed_state))
    try:
        x = np.random.default_rng(1).uniform(0, 16, FEATURES)
        r = httpx.post(f"{url}/predict", json={"input": x.tolist()}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"prediction_id", "label", "confidence", "model_version", "latency_ms"}
        assert body["model_version"] == 1
        fb = httpx.post(
            f"{url}/feedback",
            timeout=10,
            json={"prediction_id": body["prediction_id"], "true_label": (body["label"] + 1) % 10},
        )
        assert fb.status_code == 200 and fb.json() == {"captured": True}
        assert (
            httpx.post(
                f"{url}/feedback", timeout=10, json={"prediction_id": "nope", "true_label": 1}
            ).status_code
            == 404
        )
        assert httpx.post(f"{url}/predict", json={"input": [1.0]}, timeout=10).status_code == 400
        status = httpx.get(f"{url}/status", timeout=10).json()
        assert status["device_id"] == "cli-1" and status["model_version"] == 1
        assert status["spool"]["pending"] == 1
    finally:
        err = stop_agent(proc)
    for line in err.splitlines():
        json.loads(line)  # every log line on stderr is JSON


def test_run_without_model_answers_503(tmp_path, signing_key) -> None:
    proc, url = start_agent(write_config(tmp_path, signing_key, tmp_path / "empty"))
    try:
        r = httpx.post(f"{url}/predict", json={"input": [0.0] * FEATURES}, timeout=10)
        assert r.status_code == 503 and "no verified model" in r.json()["error"]
    finally:
        stop_agent(proc)


def test_check_exit_codes(tmp_path, signing_key, installed_state) -> None:
    ok = subprocess.run(
        [*AGENT, "check", "--config", str(write_config(tmp_path, signing_key, installed_state))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["model_version"] == 1
    empty = tmp_path / "other"
    empty.mkdir()
    bad = subprocess.run(
        [*AGENT, "check", "--config", str(write_config(empty, signing_key, empty / "state"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["ok"] is False


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_mistyped_config_stops_the_agent_naming_field_value_and_type(
    tmp_path, signing_key, command: str
) -> None:
    path = write_config(tmp_path, signing_key, tmp_path / "state")
    cfg = json.loads(path.read_text()) | {"mqtt_port": "oops", "spool_fsync": "no", "mqtt_prot": 1}
    path.write_text(json.dumps(cfg))
    out = subprocess.run(
        [*AGENT, command, "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stdout == ""  # `run` never started listening
    msg = json.loads(out.stderr.strip().splitlines()[-1])["msg"]
    assert 'mqtt_port: "oops" is a string, expected an integer' in msg
    assert 'spool_fsync: "no" is a string, expected true or false' in msg
    assert "mqtt_prot: unknown key (did you mean 'mqtt_port'?)" in msg
    assert not (tmp_path / "state").exists()  # refused before anything was written
