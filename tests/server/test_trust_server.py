"""The server side of the root of trust: startup checks, the trust endpoints, roots in targets,
and the offline `edgeloop keys init-root` / `sign-root` commands."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from contract import SignedEnvelope, TargetMessage, key_id, load_private_key
from contract.trust import load_pinned_root
from device_agent.verify import DeviceFacts, ReleaseTrust, verify_target
from server.core.errors import ConfigError
from server.db import audit
from server.main import create_app
from server.release.signing import load_signer, write_key_pair
from server.release.trust import load_chain, write_root
from tests.conftest import TEST_ADMIN_TOKEN
from tests.server.conftest import (
    FleetAuth,
    add_version,
    create_line,
    make_settings,
    register,
    services_of,
)


def test_trust_endpoints_serve_the_verified_chain(client: TestClient) -> None:
    body = client.get("/api/v1/trust/roots").json()
    assert body["latest_version"] == 1 and len(body["roots"]) == 1
    root = load_pinned_root(body["roots"][0])
    signer = services_of(client).signer
    assert root.roles["release"].keyids == (signer.key_id,)
    assert client.get("/api/v1/trust/root/1").json() == body["roots"][0]
    missing = client.get("/api/v1/trust/root/2")
    assert missing.status_code == 404 and "no root metadata version 2" in missing.text
    for bad in ("0", "-1", "abc", "99999999999999999999"):
        assert client.get(f"/api/v1/trust/root/{bad}").status_code == 422


def test_rotated_key_reaches_devices_with_the_target(tmp_path: Path, db_url: str) -> None:
    """Restart with a new online key: development extends the chain to root v2, the device's
    target carries v2, and a device pinned to v1 verifies the new key's releases."""
    keys = tmp_path / "keys"
    first = make_settings(tmp_path, db_url, signing_key_path=keys / "one.pem")
    write_key_pair(keys / "one.pem")
    with TestClient(create_app(first)) as c:
        c.auth = FleetAuth(TEST_ADMIN_TOKEN)
        pinned = c.get("/api/v1/trust/root/1").json()
        create_line(c)
    write_key_pair(keys / "two.pem")
    second = make_settings(tmp_path, db_url, signing_key_path=keys / "two.pem")
    with TestClient(create_app(second)) as c:
        c.auth = FleetAuth(TEST_ADMIN_TOKEN)
        services = services_of(c)
        assert [load_pinned_root(e).version for e in [pinned]] == [1]
        assert c.get("/api/v1/trust/roots").json()["latest_version"] == 2
        add_version(services, version=1, status="champion", champion_release=True)
        register(c, "dev-1")
        resp = c.get("/api/v1/devices/dev-1/target")
        assert resp.status_code == 200, resp.text
        target = TargetMessage.from_dict(resp.json())
        with services.sessions() as session:
            entries = [
                (e.action, e.subject, e.details)
                for e in audit.list_entries(session)
                if e.action in ("root.publish", "key.rotate")
            ]
    assert len(target.roots) == 1
    two_kid = key_id(load_private_key((keys / "two.pem").read_bytes()).public_key())
    # Each root version is audited once (the first start recorded v1, the restart v2 + rotation).
    assert [(a, s) for a, s, _ in entries] == [
        ("root.publish", "root:1"),
        ("root.publish", "root:2"),
        ("key.rotate", "root:2"),
    ]
    assert entries[2][2] == {"added": [two_kid], "revoked": []}
    trust, _, problem = ReleaseTrust.pinned(pinned)
    assert problem is None and trust.root is not None and trust.root.version == 1
    with pytest.raises(Exception, match="valid signature"):  # v1 alone does not know key two
        verify_target(target, trust, model_line="digits", highest_release=0, now=_now())
    trust, applied = trust.with_roots(list(target.roots))
    assert len(applied) == 1 and trust.root is not None and trust.root.version == 2
    m = verify_target(
        target,
        trust,
        model_line="digits",
        highest_release=0,
        now=_now(),
        device=DeviceFacts("dev-1"),
    )
    assert m.release == 1
    two = load_private_key((keys / "two.pem").read_bytes())
    assert target.envelope["signatures"][0]["keyid"] == key_id(two.public_key())


def _now() -> datetime:
    return datetime.now(UTC)


def test_production_refuses_without_a_root_or_with_an_uncertified_key(
    tmp_path: Path, db_url: str
) -> None:
    write_key_pair(tmp_path / "k" / "signing.pem")
    prod = make_settings(
        tmp_path,
        db_url,
        environment="production",
        signing_key_path=tmp_path / "k" / "signing.pem",
        trust_dir=tmp_path / "trust",
    )
    with pytest.raises(ConfigError, match="production refuses to generate a root"):
        load_signer(prod)
    assert not (tmp_path / "trust" / "1.root.json").exists()
    # A root made offline for another key: still refused, naming the fix.
    other = tmp_path / "other.pem"
    write_key_pair(other)
    cli("keys", "init-root", "--out", str(tmp_path / "trust"), "--release-key-pub",
        str(tmp_path / "other.pub.pem"))  # fmt: skip
    with pytest.raises(ConfigError, match="not in the release role of root v1"):
        load_signer(prod)


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli.main", *args], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def test_offline_threshold_root_rotation_and_revocation(tmp_path: Path, db_url: str) -> None:
    root_dir, trust = tmp_path / "offline", tmp_path / "trust"
    old_pub = write_key_pair(tmp_path / "old.pem")
    new_pub = write_key_pair(tmp_path / "new.pem")
    cli("keys", "init-root", "--out", str(root_dir), "--release-key-pub", str(old_pub),
        "--count", "3", "--threshold", "2")  # fmt: skip
    trust.mkdir()
    (trust / "1.root.json").write_bytes((root_dir / "1.root.json").read_bytes())
    v1 = load_chain(trust)
    assert v1 is not None and v1.latest.threshold("root") == 2
    old_kid = v1.latest.roles["release"].keyids[0]
    rotate = ["keys", "sign-root", "--trust-dir", str(trust), "--add-release-key", str(new_pub),
              "--revoke", old_kid[:16]]  # fmt: skip
    # One root key of a 2-of-3 root: refused, and nothing is written.
    bad = cli(*rotate, "--root-key", str(root_dir / "root-1.pem"), ok=False)
    assert "2 required" in " ".join((bad.stdout + bad.stderr).split())
    assert not (trust / "2.root.json").exists()
    cli(*rotate, "--root-key", str(root_dir / "root-1.pem"), "--root-key",
        str(root_dir / "root-3.pem"))  # fmt: skip
    chain = load_chain(trust)
    assert chain is not None and chain.latest.version == 2
    new_kid = key_id(load_private_key((tmp_path / "new.pem").read_bytes()).public_key())
    assert chain.latest.roles["release"].keyids == (new_kid,)

    # Production starts with the new key and refuses the revoked one.
    def prod(key: str):  # noqa: ANN202
        return make_settings(
            tmp_path, db_url, environment="production", signing_key_path=tmp_path / key,
            trust_dir=trust,
        )  # fmt: skip

    assert load_signer(prod("new.pem")).roots == (chain.envelopes[1],)
    with pytest.raises(ConfigError, match="not in the release role of root v2"):
        load_signer(prod("old.pem"))
    # A published version is never rewritten.
    with pytest.raises(ConfigError, match="never rewritten"):
        write_root(trust, SignedEnvelope.from_dict(chain.envelopes[1]), 2)
