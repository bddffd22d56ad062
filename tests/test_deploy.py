"""The deployment files: docker-compose.yml is valid and wires broker, database, the schema
upgrade, server, devices."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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


def test_compose_wires_broker_database_upgrade_server_and_devices():
    done = subprocess.run(
        [compose(), "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert set(done.stdout.split()) == {"mosquitto", "postgres", "migrate", "server", "devices"}
    full = subprocess.run(
        [compose(), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "eclipse-mosquitto" in full
    assert "EDGELOOP_DATABASE_URL: postgresql+psycopg://" in full
    assert "EDGELOOP_MQTT_HOST: mosquitto" in full
    # The server starts only after `edgeloop db upgrade` ran to completion on the same database.
    assert "entrypoint:\n    - edgeloop\n    - db\n    - upgrade\n" in full
    assert "migrate:\n        condition: service_completed_successfully\n" in full


def test_agent_image_installs_only_the_agent_extra():
    stages = (ROOT / "Dockerfile").read_text().split("FROM ")
    agent_stage = next(s for s in stages if s.startswith("base AS agent"))
    agent = "\n".join(ln for ln in agent_stage.splitlines() if not ln.lstrip().startswith("#"))
    assert 'pip install ".[agent]"' in agent
    assert "server" not in agent and "training" not in agent
