"""The pinned root in the agent config, and the persisted root chain across restarts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import ConfigError, load_config
from device_agent.store import ModelStore
from device_agent.verify import ReleaseTrust
from server.release.trust import new_root, next_root

NOW = datetime.now(UTC)


def _roots() -> tuple[bytes, dict, Ed25519PrivateKey]:
    root_key, k1, k2 = (Ed25519PrivateKey.generate() for _ in range(3))
    v1 = new_root([root_key.public_key()], [k1.public_key()], threshold=1, now=NOW, ttl_days=9)
    v2 = next_root(v1, now=NOW, ttl_days=9, add_release=[k2.public_key()])
    return v1.sign([root_key]).to_json(), v2.sign([root_key]).to_dict(), k1


def test_trusted_root_file_relative_to_the_config_and_groups_from_env(tmp_path: Path) -> None:
    pinned, _, _ = _roots()
    (tmp_path / "root.json").write_bytes(pinned)
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps(
            {
                "device_id": "d-1",
                "model_line": "digits",
                "trusted_root_file": "root.json",
                "hardware": "rpi4",
            }
        )
    )
    cfg = load_config(path, env={"EDGELOOP_AGENT_GROUPS": "canary, eu"})
    assert cfg.trusted_root == pinned and cfg.trusted_keys == []
    assert cfg.groups == ["canary", "eu"] and cfg.hardware == "rpi4"


@pytest.mark.parametrize(
    "content", [b"not json", b'{"payloadType": "x", "payload": "", "signatures": []}']
)
def test_invalid_pinned_root_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "root.json").write_bytes(content)
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps({"device_id": "d", "model_line": "l", "trusted_root_file": "root.json"})
    )
    with pytest.raises(ConfigError, match="root"):
        load_config(path, env={})


def test_persisted_chain_is_reverified_and_a_bad_entry_cuts_it(tmp_path: Path) -> None:
    pinned, v2, k1 = _roots()
    store = ModelStore(tmp_path)
    store.save_roots([v2])
    trust, kept, problem = ReleaseTrust.pinned(pinned, store.load_roots())
    assert problem is None and trust.root is not None and trust.root.version == 2
    assert len(kept) == 1
    # An edited trust.json (a signature replaced) adds no trust: it is cut at the bad entry.
    forged = dict(v2, signatures=[{"keyid": "00" * 32, "sig": "AAAA"}])
    trust, kept, problem = ReleaseTrust.pinned(pinned, [forged])
    assert problem is not None and trust.root is not None and trust.root.version == 1
    assert kept == []
    # A corrupt file counts as no learned roots (moved aside), never as a crash.
    store.trust_path.write_text("{not json")
    assert store.load_roots() == []
    assert store.trust_path.with_suffix(".corrupt").exists()


def test_the_example_config_in_deploy_loads(tmp_path: Path) -> None:
    """deploy/agent.example.json (the docs point a new device at it) is a valid config once its
    root file exists: every key in it is a real setting."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "agent.example.json"
    pinned, _, _ = _roots()
    (tmp_path / "root-1.json").write_bytes(pinned)
    (tmp_path / "agent.json").write_text(example.read_text())
    cfg = load_config(tmp_path / "agent.json", env={})
    assert cfg.device_id == "cam-0001" and cfg.model_line == "digits"
    assert cfg.trusted_root == pinned and cfg.groups == ["site-east"]
    assert cfg.monitor_interval_s == 60.0
