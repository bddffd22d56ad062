"""The deployment files: docker-compose.yml is valid and wires broker, database, the schema
upgrade, two server replicas, a training worker, devices; the Dockerfile builds an image per
role, the server's without torch or scikit-learn; the systemd units."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose (Debian's package) is not installed: run scripts/setup.sh")
    return exe


def test_compose_file_is_valid():
    done = subprocess.run(
        [compose(), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _compose_config() -> dict:
    done = subprocess.run(
        [compose(), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    config = yaml.safe_load(done.stdout)
    assert isinstance(config, dict)
    return config


def _mounts(service: dict) -> set[tuple[str, str]]:
    """(source, target) of each volume (docker-compose 1 prints ``source:target:mode``)."""
    out = set()
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.add((v["source"], v["target"]))
        else:
            source, target = v.split(":")[:2]
            out.add((source, target))
    return out


def test_compose_wires_broker_database_upgrade_servers_worker_and_devices():
    config = _compose_config()
    services = config["services"]
    assert set(services) == {
        "mosquitto",
        "postgres",
        "migrate",
        "server-a",
        "server-b",
        "worker",
        "devices",
    }
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto")
    # Every process that touches the database waits for `edgeloop db upgrade` to finish.
    assert services["migrate"]["entrypoint"] == ["edgeloop", "db", "upgrade"]
    for name in ("server-a", "worker"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    servers = [services["server-a"], services["server-b"]]
    worker = services["worker"]
    for s in (*servers, worker):
        env = s["environment"]
        assert env["EDGELOOP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["EDGELOOP_ARTIFACT_STORE_URL"] == "file:///artifacts"
        # One named volume for the artifact store, mounted by both servers and the worker.
        assert ("artifacts", "/artifacts") in _mounts(s)
    for s in servers:
        env = s["environment"]
        assert s["build"]["target"] == "server"
        assert env["EDGELOOP_EMBEDDED_WORKER"] == "false"
        assert env["EDGELOOP_MQTT_HOST"] == "mosquitto"
        assert env["EDGELOOP_MQTT_SHARED_GROUP"]  # the replicas share the device reports
        assert env["EDGELOOP_SIGNING_KEY_PATH"] == "/keys/signing.pem"
        assert ("release-keys", "/keys") in _mounts(s)
    assert worker["build"]["target"] == "worker"
    assert worker.get("entrypoint") is None  # the image's: edgeloop worker
    assert "EDGELOOP_SIGNING_KEY_PATH" not in worker["environment"]  # workers never sign
    assert not any(source == "release-keys" for source, _ in _mounts(worker))


def _stage(name: str) -> str:
    stages = (ROOT / "Dockerfile").read_text().split("FROM ")
    stage = next(s for s in stages if s.split("\n", 1)[0].endswith(f"AS {name}"))
    return "\n".join(ln for ln in stage.splitlines() if not ln.lstrip().startswith("#"))


def test_server_image_installs_no_training_and_the_worker_image_does():
    server = _stage("server")
    assert 'pip install ".[server]"' in server and "training" not in server
    assert '! python -c "import torch"' in server and '! python -c "import sklearn"' in server
    assert 'ENTRYPOINT ["edgeloop-server"]' in server
    worker = _stage("worker")
    assert 'pip install ".[worker]"' in worker and 'ENTRYPOINT ["edgeloop", "worker"]' in worker
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name in ("torch", "torchvision", "scikit-learn", "skl2onnx"):
        assert not any(dep.startswith(name) for dep in extras["server"]), name
        assert any(dep.startswith(name) for dep in extras["training"]), name
    assert extras["worker"] == ["edgeloop[server,training]"]


def test_systemd_unit_runs_the_worker_beside_the_agent():
    unit = (ROOT / "deploy" / "edgeloop-worker.service").read_text()
    assert "ExecStart=/opt/edgeloop/.venv/bin/edgeloop worker" in unit
    assert "EnvironmentFile=-/etc/edgeloop/worker.env" in unit
    assert "KillSignal=SIGTERM" in unit and "Restart=always" in unit


def test_agent_image_installs_only_the_agent_extra():
    stages = (ROOT / "Dockerfile").read_text().split("FROM ")
    agent_stage = next(s for s in stages if s.startswith("base AS agent"))
    agent = "\n".join(ln for ln in agent_stage.splitlines() if not ln.lstrip().startswith("#"))
    assert 'pip install ".[agent]"' in agent
    assert "server" not in agent and "training" not in agent
