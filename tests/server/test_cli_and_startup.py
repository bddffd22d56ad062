"""The operator CLI against a real uvicorn server, and startup rules for keys and bootstrap."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from contract import load_private_key, load_public_key
from server.cli.main import app as cli_app
from server.core.config import Settings
from server.core.errors import ConfigError
from server.main import create_app
from server.services import Services
from tests.authkit import FleetAuth, enroll
from tests.conftest import TEST_ADMIN_TOKEN, free_port, upgraded, write_key_pair
from tests.server.conftest import add_version, make_settings, wait_for


@pytest.fixture
def live_server(tmp_path: Path, signing_key) -> Iterator[tuple[str, Services]]:
    """A real uvicorn on a free port (the CLI talks real HTTP)."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    port = free_port()
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path}/cli.db",
        signing_key_path=priv,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        bootstrap_line="digits",
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn started")
    yield f"http://127.0.0.1:{port}", app.state.services
    server.should_exit = True
    thread.join(20)


def run_cli(url: str, *args: str, token: str = TEST_ADMIN_TOKEN) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli_app, ["--server", url, "--token", token, *args], env={"COLUMNS": "250"}
    )
    return result.exit_code, result.output


def test_cli_lists_triggers_and_approves(live_server) -> None:
    url, services = live_server
    # bootstrap_line created the line with its initial job.
    code, out = run_cli(url, "jobs", "list")
    assert code == 0 and "initial" in out
    code, out = run_cli(url, "jobs", "trigger", "digits")
    assert code == 1 and "already queued" in out
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    services.rollouts.create(
        model_line="digits", model_version=2, canary_percent=None, created_by="ci"
    )
    code, out = run_cli(url, "rollouts", "list")
    assert code == 0 and "pending_approval" in out
    # The admin mints an approver token for alice; she approves with it (the name comes from
    # her token; "--as" must agree with it).
    code, out = run_cli(url, "tokens", "create", "--name", "alice", "--role", "approver")
    assert code == 0 and "alice (approver)" in out
    alice = out.strip().splitlines()[-1]
    code, out = run_cli(url, "whoami", token=alice)
    assert code == 0 and "alice (approver)" in out
    code, out = run_cli(url, "rollouts", "approve", "1", "--as", "bob", token=alice)
    assert code == 1 and "not the authenticated operator" in out
    code, out = run_cli(url, "rollouts", "approve", "1", token="wrong")
    assert code == 1 and "error 401" in out
    code, out = run_cli(url, "rollouts", "approve", "1", "--as", "alice", token=alice)
    assert code == 0 and "canary" in out
    code, out = run_cli(url, "rollouts", "show", "1")
    assert code == 0 and '"approved_by": "alice"' in out
    code, out = run_cli(url, "rollouts", "pause", "1")
    assert code == 0 and "paused" in out
    code, out = run_cli(url, "rollouts", "resume", "1")
    assert code == 0 and "canary" in out
    code, out = run_cli(url, "rollouts", "abort", "1", "--reason", "demo")
    assert code == 0 and "rolled_back" in out
    code, out = run_cli(url, "rollouts", "approve", "42", token=alice)
    assert code == 1 and "unknown rollout 42" in out
    code, out = run_cli(url, "devices", "enroll-token", "--uses", "3")
    assert code == 0 and "3 uses" in out
    code, out = run_cli(url, "models", "list", "digits")
    assert code == 0 and "champion" in out
    code, out = run_cli(url, "devices", "list")
    assert code == 0


def test_keys_init_writes_a_usable_pair(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["keys", "init", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    priv = load_private_key((tmp_path / "k" / "signing.pem").read_bytes())
    pub = load_public_key((tmp_path / "k" / "signing.pub.pem").read_bytes())
    assert priv.public_key() == pub
    assert (tmp_path / "k" / "signing.pem").stat().st_mode & 0o077 == 0
    again = CliRunner().invoke(cli_app, ["keys", "init", str(tmp_path / "k")])
    assert again.exit_code == 1


def test_development_generates_a_key_production_refuses(tmp_path: Path) -> None:
    dev = Settings(
        data_dir=tmp_path / "dev",
        database_url=upgraded(f"sqlite:///{tmp_path}/dev.db"),
        enable_mqtt=False,
    )
    create_app(dev).state.services.stop()
    assert (tmp_path / "dev" / "keys" / "signing.pem").exists()
    assert (tmp_path / "dev" / "keys" / "signing.pub.pem").exists()
    prod = Settings(
        environment="production",
        admin_token="a-real-admin-token",
        data_dir=tmp_path / "prod",
        database_url=upgraded(f"sqlite:///{tmp_path}/prod.db"),
        enable_mqtt=False,
    )
    with pytest.raises(ConfigError, match="production refuses"):
        create_app(prod)


def test_cli_lineage_and_registry(live_server) -> None:
    import httpx

    from server.db.base import utcnow
    from server.db.registry import ModelVersion
    from server.retrain.lineage import store_dataset
    from tests.server.conftest import sample

    url, services = live_server
    with httpx.Client(base_url=url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=30) as http:
        enroll(http, "cam-9", "digits")
        batch = [sample("cam-9", sample_id=f"z{i}") for i in range(3)]
        assert http.post("/api/v1/samples", json={"samples": batch}).json()["accepted"] == 3
    code, out = run_cli(url, "devices", "revoke", "cam-9")
    assert code == 0 and "cam-9 revoked" in out
    add_version(services, version=1, status="champion", champion_release=True)
    version = "ab" * 32
    with services.sessions() as s:
        store_dataset(
            s,
            manifest={
                "dataset_version": version,
                "base": {"name": "digits-train", "sha256": "cd" * 32, "count": 1000},
                "split": {"field_fraction": 0.2},
                "samples": {"train_ids": ["z0", "z1"], "field_ids": ["z2"], "rejected": []},
                "counts": {"train": 1002, "field_eval": 1},
            },
            line="digits",
            job_id=None,
            now=utcnow(),
        )
        mv = s.query(ModelVersion).filter_by(version=1).one()
        mv.dataset_version = version
        s.commit()
    code, out = run_cli(url, "lineage", "model", "digits", "1")
    assert code == 0 and version in out and "cam-9" in out and "2 train, 1 field" in out
    code, out = run_cli(url, "lineage", "sample", "z2")
    assert code == 0 and version in out and "champion" in out
    code, out = run_cli(url, "lineage", "device", "cam-9")
    assert code == 0 and "3 accepted samples" in out
    code, out = run_cli(url, "lineage", "dataset", version)
    assert code == 0 and "cam-9" in out
    code, out = run_cli(url, "models", "alias", "digits", "champion")
    assert code == 0 and "digits v1" in out
    code, out = run_cli(url, "models", "show", "digits", "1")
    assert code == 0 and "champion" in out
    code, out = run_cli(url, "lineage", "sample", "nope")
    assert code == 1 and "unknown sample" in out


def test_server_help_prints_help_and_writes_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from server.main import run; run()", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: edgeloop-server")
    assert "EDGELOOP_DATABASE_URL" in out.stdout and "EDGELOOP_PUBLIC_URL" in out.stdout
    assert list(tmp_path.iterdir()) == []  # no ./var, no key, no database


def test_a_server_on_another_port_sends_devices_to_that_port(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    from fastapi.testclient import TestClient

    from tests.server.conftest import create_line, register

    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(tmp_path, db_url, signing_key_path=priv, port=8731)
    assert settings.public_url == "http://127.0.0.1:8731"
    with TestClient(create_app(settings)) as client:
        client.auth = FleetAuth(TEST_ADMIN_TOKEN)
        create_line(client)
        register(client, "cam-port")
        add_version(client.app.state.services, version=1, status="champion", champion_release=True)
        target = client.get("/api/v1/devices/cam-port/target")
        assert target.status_code == 200, target.text
        assert target.json()["artifact_url"].startswith("http://127.0.0.1:8731/api/v1/artifacts/")
    assert Settings(host="0.0.0.0", port=9000).public_url == "http://127.0.0.1:9000"
    assert Settings(public_url="https://models.example.com").public_url == (
        "https://models.example.com"
    )


def test_cli_401_says_how_to_pass_a_token_and_json_lists_for_scripts(live_server) -> None:
    import json

    url, _ = live_server
    code, out = run_cli(url, "devices", "list", token="")
    assert code == 1
    assert "error 401" in out and "--token" in out and "EDGELOOP_TOKEN" in out
    code, out = run_cli(url, "--json", "jobs", "list")
    assert code == 0
    jobs = json.loads(out)
    assert isinstance(jobs, list) and jobs and "initial" in json.dumps(jobs)
