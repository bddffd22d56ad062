"""``edgeloop-agent install DIR``: a release exported from a real server installs with no server
and no broker, through the online update's verification; a changed byte or an older release is
refused and nothing is installed. Real ONNX Runtime, real CLI entry points."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from device_agent.cli import main as agent_main
from server.cli.main import app as server_cli
from tests.conftest import TEST_ADMIN_TOKEN
from tests.device_agent.agent_testkit import FEATURES, make_model, truth_label
from tests.device_agent.test_agent_cli import start_agent, stop_agent
from tests.server.export_kit import ReleaseServer, release_server

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Releases 1 (model seed 1) and 2 (seed 2) exported from a real server, then the server
    stopped: everything after this runs with no server at all."""
    tmp = tmp_path_factory.mktemp("export")
    with release_server(tmp) as srv:
        out = {"pinned_root": srv.pinned_root}
        for version, seed in ((1, 1), (2, 2)):
            release = srv.add_release(version, make_model(seed))
            out[release] = export(srv, release, tmp / f"release-{release}")
        shutil.copy(srv.pinned_root, tmp / "pinned.root.json")
    out["pinned_root"] = tmp / "pinned.root.json"
    yield out


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """The agent's main() points the root logger at its JSON handler; undo that for the
    tests that run after these in the same process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def export(srv: ReleaseServer, release: int, directory: Path) -> Path:
    result = CliRunner().invoke(
        server_cli,
        ["--server", srv.url, "--token", TEST_ADMIN_TOKEN, "releases", "export", "digits"]
        + [str(release), str(directory)],
    )
    assert result.exit_code == 0, result.output
    return directory


def agent_config(tmp_path: Path, pinned_root: Path, state_dir: Path) -> Path:
    """A device of the fleet: pinned to root v1, pointed at a server and broker that are not
    there (port 9: nothing listens)."""
    cfg = {
        "device_id": "site-1",
        "model_line": "digits",
        "server_url": "http://127.0.0.1:9",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": 9,
        "state_dir": str(state_dir),
        "trusted_root_file": str(pinned_root),
        "metrics_interval_s": 0.5,
    }
    path = tmp_path / f"agent-{state_dir.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def install(config: Path, directory: Path, capsys) -> tuple[int, dict[str, Any]]:
    """``edgeloop-agent install`` through its real entry point; (exit code, printed JSON)."""
    capsys.readouterr()
    code = agent_main(["install", "--config", str(config), str(directory)])
    return code, json.loads(capsys.readouterr().out)


def persisted(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "state.json"
    return json.loads(path.read_bytes()) if path.exists() else {}


def models(state_dir: Path) -> list[str]:
    return sorted(p.name for p in (state_dir / "models").glob("*"))


def predict(url: str, seed: int) -> dict[str, Any]:
    x = np.random.default_rng(seed).uniform(0, 1, FEATURES)
    r = httpx.post(f"{url}/predict", json={"input": x.tolist()}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == truth_label(body["model_version"], x)  # that model's own answer
    return body


def test_exported_release_installs_offline_and_a_later_start_serves_it(
    tmp_path, exported, capsys
) -> None:
    state = tmp_path / "state"
    config = agent_config(tmp_path, exported["pinned_root"], state)

    code, out = install(config, exported[1], capsys)
    assert code == 0, out
    assert out["ok"] and out["state"] == "committed", out
    assert (out["release"], out["model_version"], out["trust_root_version"]) == (1, 1, 2)
    st = persisted(state)
    assert st["current"]["release"] == 1 and st["highest_release"] == 1
    assert models(state) == [f"{st['current']['sha256']}.onnx"]
    trust = json.loads((state / "trust.json").read_bytes())
    assert len(trust["roots"]) == 1  # root v2 learned (v1 is pinned)

    # A newer release on a device that serves one: swapped in on probation, which the next
    # `run` judges on live traffic (as online); the old model stays in the previous slot.
    code, out = install(config, exported[2], capsys)
    assert code == 0 and out["state"] == "probation" and out["release"] == 2, out
    st = persisted(state)
    assert (st["current"]["release"], st["previous"]["release"]) == (2, 1)

    proc, url = start_agent(config)
    try:
        assert predict(url, 5)["model_version"] == 2
        status = httpx.get(f"{url}/status", timeout=10).json()
        assert status["release"] == 2 and status["update"]["state"] == "probation"
        assert status["trust_root_version"] == 2
    finally:
        stop_agent(proc)


def _flip_base64(path: Path) -> None:
    """Change one byte in the middle of the envelope's base64 payload (still valid base64)."""
    raw = bytearray(path.read_bytes())
    start = raw.index(b'"payload":"') + len(b'"payload":"')
    i = start + (raw.index(b'"', start) - start) // 2
    raw[i] = ord(_B64[(_B64.index(chr(raw[i])) + 1) % 64])
    path.write_bytes(bytes(raw))


def _flip_last(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("changed", "flip", "error"),
    [
        ("model.onnx", _flip_last, "HashMismatchError"),
        ("envelope.json", _flip_base64, "SignatureInvalidError"),
        ("roots/2.root.json", _flip_base64, "RootInvalidError"),
        ("roots/1.root.json", _flip_base64, "RootInvalidError"),
    ],
)
def test_one_byte_changed_is_refused_and_nothing_installed(
    tmp_path, exported, capsys, changed, flip, error
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported[2], bundle)
    flip(bundle / changed)
    state = tmp_path / "state"
    code, out = install(agent_config(tmp_path, exported["pinned_root"], state), bundle, capsys)
    assert code == 1, out
    assert not out["ok"] and out["state"] == "refused"
    assert out["reason"].startswith(f"{error}:"), out["reason"]
    st = persisted(state)
    assert st.get("current") is None and st.get("highest_release", 0) == 0
    assert models(state) == []
    assert not list((state / "downloads").glob("*"))
    # The untouched bundle still installs on that device: the refusal left nothing behind.
    code, out = install(agent_config(tmp_path, exported["pinned_root"], state), exported[2], capsys)
    assert code == 0 and out["state"] == "committed", out


def test_an_older_release_after_a_newer_one_is_refused(tmp_path, exported, capsys) -> None:
    state = tmp_path / "state"
    config = agent_config(tmp_path, exported["pinned_root"], state)
    assert install(config, exported[2], capsys)[1]["state"] == "committed"
    code, out = install(config, exported[1], capsys)
    assert code == 1 and out["reason"].startswith("RollbackRefusedError:"), out
    st = persisted(state)
    assert st["current"]["release"] == 2 and st["highest_release"] == 2
    assert st["previous"] is None and len(models(state)) == 1


def test_a_bundle_of_another_fleet_or_an_incomplete_one_is_refused(
    tmp_path, exported, capsys
) -> None:
    state = tmp_path / "state"
    config = agent_config(tmp_path, exported["pinned_root"], state)
    missing = tmp_path / "missing"
    shutil.copytree(exported[2], missing)
    (missing / "model.onnx").unlink()
    code, out = install(config, missing, capsys)
    assert code == 1 and out["reason"].startswith("BundleError:") and "model.onnx" in out["reason"]
    code, out = install(config, tmp_path / "nowhere", capsys)
    assert code == 1 and out["reason"].startswith("BundleError:") and "bundle.json" in out["reason"]
    # Another fleet: its own root v1, which this device does not pin.
    other = tmp_path / "other-fleet"
    with release_server(tmp_path / "fleet-b") as srv:
        export(srv, srv.add_release(1, make_model(1)), other)
    code, out = install(config, other, capsys)
    assert code == 1 and out["reason"].startswith("RootInvalidError:"), out
    assert "another fleet" in out["reason"]
    assert models(state) == [] and persisted(state).get("current") is None
