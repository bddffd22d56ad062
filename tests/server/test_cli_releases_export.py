"""``edgeloop releases export`` against a real server: what lands in the directory, and refusals."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from contract.bundle import BundleIndex
from server.cli.main import app as cli_app
from tests.conftest import TEST_ADMIN_TOKEN, auth_headers
from tests.device_agent.agent_testkit import make_model
from tests.server.export_kit import ReleaseServer, expired, release_server


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ReleaseServer]:
    with release_server(tmp_path) as s:
        yield s


def export(url: str, *args: str, token: str = TEST_ADMIN_TOKEN) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli_app,
        ["--server", url, "--token", token, "releases", "export", *args],
        env={"COLUMNS": "250"},
    )
    return result.exit_code, result.output


def test_export_writes_envelope_artifact_roots_and_index(srv: ReleaseServer, tmp_path) -> None:
    model = make_model(3)
    release = srv.add_release(1, model)
    out = tmp_path / "bundle"
    code, text = export(srv.url, "digits", str(release), str(out))
    assert code == 0, text
    assert f"exported digits release {release}" in text and "root v1..v2" in text

    index = BundleIndex.from_json((out / "bundle.json").read_bytes())
    assert (index.model_line, index.release, index.model_version) == ("digits", release, 1)
    assert index.roots == ("roots/1.root.json", "roots/2.root.json")
    assert index.exported_from == srv.url
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "bundle.json",
        "envelope.json",
        "model.onnx",
        "roots/1.root.json",
        "roots/2.root.json",
    ]
    # Every piece is what the server's API serves, byte for byte where it is bytes.
    api = httpx.Client(base_url=srv.url, headers=auth_headers(TEST_ADMIN_TOKEN), timeout=30)
    with api:
        served = api.get(f"/api/v1/model-lines/digits/releases/{release}").json()
        roots = api.get("/api/v1/trust/roots").json()["roots"]
    assert json.loads((out / "envelope.json").read_bytes()) == served["envelope"]
    assert (out / "model.onnx").read_bytes() == model
    assert hashlib.sha256(model).hexdigest() == served["sha256"]
    for version, root in enumerate(roots, start=1):
        assert json.loads((out / f"roots/{version}.root.json").read_bytes()) == root
    assert (out / "roots/1.root.json").read_bytes() == srv.pinned_root.read_bytes()


def test_export_refusals(srv: ReleaseServer, tmp_path) -> None:
    release = srv.add_release(1, make_model(3))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "other.txt").write_text("not a bundle")
    code, text = export(srv.url, "digits", str(release), str(busy))
    assert code == 1 and "not an empty directory" in text
    assert sorted(p.name for p in busy.iterdir()) == ["other.txt"]

    code, text = export(srv.url, "digits", "99", str(tmp_path / "none"))
    assert code == 1 and "has no release 99" in text
    code, text = export(srv.url, "digits", str(release), str(tmp_path / "x"), token="wrong")
    assert code == 1 and "error 401" in text
    assert not (tmp_path / "none").exists() and not (tmp_path / "x").exists()

    old = srv.add_release(2, make_model(4), now=expired(srv.services), ttl_days=1)
    code, text = export(srv.url, "digits", str(old), str(tmp_path / "old"))
    assert code == 1 and "expired" in text and "devices would refuse" in text
