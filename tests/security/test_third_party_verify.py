"""A bundle made by the server's own code verifies with only the documented format.

The bundle (root chain, manifest envelope, artifact) is produced here with edgeloop: the
server's startup path (``load_signer``: development root v1, then a rotation to a second
online key, which extends the chain to root v2) and ``Signer.sign``. It is then checked by
``standalone_verifier.py``, run as a separate ``python -I`` process that imports only the
standard library and ``cryptography`` and reports which edgeloop modules got loaded (none may).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from contract.messages import TargetMessage
from device_agent.errors import (
    ExpiredManifestError,
    RollbackRefusedError,
    RootExpiredError,
    TargetingMismatchError,
)
from device_agent.verify import DeviceFacts, ReleaseTrust, verify_target
from server.core.config import Settings
from server.release.signing import Signer, load_signer, write_key_pair
from tests.device_agent.agent_testkit import make_manifest, make_model

VERIFIER = Path(__file__).with_name("standalone_verifier.py")
NOW = datetime.now(UTC)


def run_verifier(tmp_path: Path, request: dict[str, Any]) -> dict[str, Any]:
    req = tmp_path / "request.json"
    req.write_text(json.dumps(request))
    proc = subprocess.run(
        [sys.executable, "-I", str(VERIFIER), str(req)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the repository: nothing of edgeloop on the path by accident
    )
    assert proc.returncode in (0, 1), proc.stderr
    out = json.loads(proc.stdout)
    assert out["modules"] == [], f"the verifier imported edgeloop: {out['modules']}"
    assert out["ok"] == (proc.returncode == 0)
    return out


@pytest.fixture
def bundle(tmp_path: Path) -> dict[str, Any]:
    data_dir = tmp_path / "var"
    first = load_signer(Settings(data_dir=data_dir, database_url="sqlite://"))
    assert first.chain is not None and first.chain.latest.version == 1
    # Rotation: a new online key; the (development) root signs root v2 listing it.
    write_key_pair(data_dir / "keys" / "signing-2.pem")
    signer: Signer = load_signer(
        Settings(
            data_dir=data_dir,
            database_url="sqlite://",
            signing_key_path=data_dir / "keys" / "signing-2.pem",
        )
    )
    assert signer.chain is not None and signer.chain.latest.version == 2
    model = make_model(7)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "model.onnx").write_bytes(model)
    manifest = make_manifest(model, release=4, model_version=2)
    (out / "manifest.json").write_bytes(signer.sign(manifest).to_json())
    trust_dir = data_dir / "trust"
    return {
        "pinned_root": str(trust_dir / "1.root.json"),
        "later_roots": [str(trust_dir / "2.root.json")],
        "manifest": str(out / "manifest.json"),
        "artifact": str(out / "model.onnx"),
        "device": {"device_id": "dev-1", "groups": [], "hardware_class": "generic"},
        "now": NOW.isoformat(),
        "release_floor": 1,
    }


def test_genuine_bundle_verifies(tmp_path: Path, bundle: dict[str, Any]) -> None:
    out = run_verifier(tmp_path, bundle)
    assert out == {"ok": True, "reason": "ok", "release": 4, "modules": []}


def _edit_payload(path: Path, change: Any) -> None:
    env = json.loads(path.read_bytes())
    payload = json.loads(base64.b64decode(env["payload"]))
    change(payload)
    env["payload"] = base64.b64encode(
        json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    ).decode()
    path.write_text(json.dumps(env))


def test_tampered_manifest_payload_is_rejected(tmp_path: Path, bundle: dict[str, Any]) -> None:
    _edit_payload(Path(bundle["manifest"]), lambda p: p.update(release=99))
    out = run_verifier(tmp_path, bundle)
    assert not out["ok"] and "valid signatures" in out["reason"]


def test_tampered_artifact_is_rejected(tmp_path: Path, bundle: dict[str, Any]) -> None:
    art = Path(bundle["artifact"])
    data = bytearray(art.read_bytes())
    data[-1] ^= 0x01
    art.write_bytes(bytes(data))
    out = run_verifier(tmp_path, bundle)
    assert not out["ok"] and "sha256" in out["reason"]


def test_without_the_rotation_root_the_new_key_is_not_trusted(
    tmp_path: Path, bundle: dict[str, Any]
) -> None:
    bundle["later_roots"] = []
    out = run_verifier(tmp_path, bundle)
    assert not out["ok"] and "0 valid signatures" in out["reason"]


def test_tampered_root_is_rejected(tmp_path: Path, bundle: dict[str, Any]) -> None:
    _edit_payload(
        Path(bundle["later_roots"][0]), lambda p: p.update(expires_at="2099-01-01T00:00:00Z")
    )
    out = run_verifier(tmp_path, bundle)
    assert not out["ok"] and "valid signatures" in out["reason"]


def test_expired_and_replayed_bundles_are_rejected(tmp_path: Path, bundle: dict[str, Any]) -> None:
    late = dict(bundle, now=(NOW + timedelta(days=31)).isoformat())
    assert "expired" in run_verifier(tmp_path, late)["reason"]
    replay = dict(bundle, release_floor=5)
    assert "below floor" in run_verifier(tmp_path, replay)["reason"]


def _doc_example(name: str) -> str:
    doc = (Path(__file__).parents[2] / "docs" / "bundle-format.md").read_text()
    block = doc.split(f"<!-- example:{name} -->", 1)[1]
    return block.split("```json", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    ("floor", "now", "groups", "verdict"),
    [
        (5, "2026-12-15T00:00:00+00:00", ["canary"], "ok"),
        (8, "2026-12-15T00:00:00+00:00", ["canary"], "below floor"),
        (5, "2026-12-31T12:00:00+00:00", ["canary"], "manifest expired"),
        (5, "2027-01-02T00:00:00+00:00", ["canary"], "root v1 expired"),
        (5, "2026-12-15T00:00:00+00:00", ["eu"], "other groups"),
    ],
)
def test_the_worked_example_of_the_spec_page_verifies(
    tmp_path: Path, floor: int, now: str, groups: list[str], verdict: str
) -> None:
    """The spec page's example is real: its bytes verify (and fail) as the page says."""
    (tmp_path / "root.json").write_text(_doc_example("root"))
    (tmp_path / "manifest.json").write_text(_doc_example("manifest"))
    (tmp_path / "model.onnx").write_bytes(b"example model bytes\n")
    out = run_verifier(
        tmp_path,
        {
            "pinned_root": str(tmp_path / "root.json"),
            "later_roots": [],
            "manifest": str(tmp_path / "manifest.json"),
            "artifact": str(tmp_path / "model.onnx"),
            "device": {"device_id": "dev-1", "groups": groups, "hardware_class": "generic"},
            "now": now,
            "release_floor": floor,
        },
    )
    assert verdict in out["reason"]
    assert out["ok"] == (verdict == "ok")


@pytest.mark.parametrize(
    ("floor", "now", "groups", "error"),
    [
        (5, "2026-12-15T00:00:00+00:00", ["canary"], None),
        (8, "2026-12-15T00:00:00+00:00", ["canary"], RollbackRefusedError),
        (5, "2026-12-31T12:00:00+00:00", ["canary"], ExpiredManifestError),
        (5, "2027-01-02T00:00:00+00:00", ["canary"], RootExpiredError),
        (5, "2026-12-15T00:00:00+00:00", ["eu"], TargetingMismatchError),
    ],
)
def test_the_worked_example_fails_in_the_agent_for_the_reason_the_page_says(
    floor: int, now: str, groups: list[str], error: type[Exception] | None
) -> None:
    """The same cases through the device agent's own verification core (steps 1 to 8)."""
    trust, _, problem = ReleaseTrust.pinned(_doc_example("root").encode())
    assert problem is None
    target = TargetMessage(
        model_line="digits", envelope=json.loads(_doc_example("manifest")), artifact_url="x"
    )
    verify = partial(
        verify_target,
        target,
        trust,
        model_line="digits",
        highest_release=floor,
        now=datetime.fromisoformat(now),
        device=DeviceFacts("dev-1", tuple(groups), "generic", max_opset=21),
        skew_s=300,
    )
    if error is None:
        manifest = verify()
        assert manifest.release == 7 and manifest.artifact.size == 20
        return
    with pytest.raises(error) as info:
        verify()
    assert type(info.value) is error
