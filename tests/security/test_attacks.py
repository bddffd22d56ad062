"""Each attack on the update path, performed against the real updater, and shown to fail.

The device is the real update machinery (store, state machine, HTTP fetcher, ONNX Runtime) with
an injected clock, pinned to root v1 only; the artifact host is a real local HTTP server that
can lie. Every test first installs release 1 (model version 1), then attacks, then checks the
three things the issue asks for: the attack is refused (REFUSED report whose reason names the
attack class), the current model keeps serving (a real inference answers with version 1), and
nothing of the attacker's was kept.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract.envelope import SignedEnvelope, key_id
from contract.manifest import Manifest, Targeting
from contract.messages import TargetMessage
from contract.trust import Root
from server.release.trust import new_root, next_root
from tests.device_agent.agent_testkit import (
    FEATURES,
    FakeServer,
    Rig,
    make_manifest,
    make_model,
    sha256,
    wait_until,
)

M1, M2, M3 = make_model(1), make_model(2), make_model(3)
NOW = datetime.now(UTC)


class Trust:
    """An offline root key, two online keys, and the root versions built from them."""

    def __init__(self) -> None:
        self.root_key = Ed25519PrivateKey.generate()
        self.k1 = Ed25519PrivateKey.generate()  # the online key of root v1
        self.k2 = Ed25519PrivateKey.generate()  # its successor
        self.v1 = new_root(
            [self.root_key.public_key()], [self.k1.public_key()], threshold=1, now=NOW, ttl_days=30
        )
        self.v1_env = self.v1.sign([self.root_key])

    def rotated(self, *, revoke_k1: bool, expires_in: timedelta = timedelta(days=30)) -> Root:
        """Root v2: adds K2 and (optionally) drops K1."""
        root = next_root(
            self.v1,
            now=NOW,
            ttl_days=30,
            add_release=[self.k2.public_key()],
            revoke=[_kid(self.k1)] if revoke_k1 else [],
        )
        return replace(root, expires_at=NOW + expires_in)

    def v2_env(self, **kw: Any) -> dict[str, Any]:
        return self.rotated(**kw).sign([self.root_key]).to_dict()


def _kid(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())


@pytest.fixture
def srv() -> Iterator[FakeServer]:
    s = FakeServer().start()
    yield s
    s.stop()


@pytest.fixture
def trust() -> Trust:
    return Trust()


def device(state_dir: Path, trust: Trust, **overrides: Any) -> Rig:
    """A device provisioned with root v1 only (no pinned release key)."""
    return Rig(
        state_dir,
        trust.k1,
        trusted_root=trust.v1_env.to_json(),
        trusted_keys=[],
        **overrides,
    )


@pytest.fixture
def rig(tmp_path: Path, trust: Trust, srv: FakeServer) -> Iterator[Rig]:
    r = device(tmp_path / "state", trust)
    t1 = target(make_manifest(M1, release=1, model_version=1), [trust.k1], srv.add("m1", M1))
    assert r.updater.handle_target(t1).value == "committed"
    yield r
    r.close()


def target(
    manifest: Manifest,
    keys: list[Ed25519PrivateKey],
    url: str,
    roots: tuple[dict[str, Any], ...] = (),
) -> TargetMessage:
    return TargetMessage(
        model_line=manifest.model_line,
        envelope=manifest.sign(keys).to_dict(),
        artifact_url=url,
        roots=roots,
    )


def assert_refused(rig: Rig, error: str, *, not_kept: bytes | None = None) -> str:
    """REFUSED reported with ``error`` as the reason's class; version 1 still answers."""
    last = rig.reports[-1]
    assert last.state.value == "refused", rig.states()
    assert last.reason is not None and last.reason.startswith(f"{error}:"), last.reason
    assert last.model_version == 1  # the report says what still serves
    x = np.random.default_rng(0).uniform(0, 16, (1, FEATURES)).astype(np.float32)
    pred, loaded = rig.runtime.predict(x)
    assert loaded.model_version == 1 and 0 <= pred.label < 10
    if not_kept is not None:
        assert not rig.store.has_model(sha256(not_kept))
    return last.reason


def test_arbitrary_artifact_is_refused(rig: Rig, srv: FakeServer, trust: Trust) -> None:
    """The host serves other bytes (same size) for a genuinely signed release."""
    url = srv.add("m2", M3)
    assert len(M3) == len(M2)
    t = target(make_manifest(M2, release=2, model_version=2), [trust.k1], url)
    assert rig.updater.handle_target(t).value == "refused"
    assert_refused(rig, "HashMismatchError", not_kept=M3)
    assert not rig.store.has_model(sha256(M2))


def test_manifest_signed_by_an_unknown_key_is_refused(
    rig: Rig, srv: FakeServer, trust: Trust
) -> None:
    rogue = Ed25519PrivateKey.generate()
    t = target(make_manifest(M2, release=2, model_version=2), [rogue], srv.add("m2", M2))
    assert rig.updater.handle_target(t).value == "refused"
    reason = assert_refused(rig, "SignatureInvalidError", not_kept=M2)
    assert "release role of root v1" in reason
    assert srv.requests_for("m2") == []  # refused before a byte was downloaded


def test_replay_of_an_older_valid_release_is_refused_even_after_restart(
    rig: Rig, srv: FakeServer, trust: Trust, tmp_path: Path
) -> None:
    old = target(make_manifest(M1, release=1, model_version=1), [trust.k1], srv.add("m1", M1))
    t2 = target(make_manifest(M2, release=2, model_version=2), [trust.k1], srv.add("m2", M2))
    t3 = target(make_manifest(M1, release=3, model_version=1), [trust.k1], srv.add("m1b", M1))
    assert rig.updater.handle_target(t2).value == "committed"
    # An operator rollback is a NEW release (3) pointing at the old bytes: accepted.
    assert rig.updater.handle_target(t3).value == "committed"
    assert rig.updater.highest_release == 3
    # The floor is persisted: a restarted device refuses the replay of release 1 and 2 alike.
    rig.close()
    again = device(tmp_path / "state", trust)
    try:
        again.updater.resume()
        for replay in (old, t2):
            assert again.updater.handle_target(replay).value == "refused"
            assert_refused(again, "RollbackRefusedError")
    finally:
        again.close()


def test_expired_manifest_and_expired_root_are_refused(
    rig: Rig, srv: FakeServer, trust: Trust
) -> None:
    past = NOW - timedelta(days=3)
    stale = make_manifest(M2, release=2, model_version=2, now=past, expires_in=timedelta(days=1))
    assert rig.updater.handle_target(target(stale, [trust.k1], srv.add("m2", M2))).value == (
        "refused"
    )
    assert_refused(rig, "ExpiredManifestError", not_kept=M2)
    # The allowance for clock skew is bounded: 10 minutes late is still expired.
    rig.now = (NOW + timedelta(days=30, minutes=10)).timestamp()
    fresh_then = make_manifest(M2, release=2, model_version=2, now=NOW)
    assert rig.updater.handle_target(target(fresh_then, [trust.k1], srv.add("m2", M2))).value == (
        "refused"
    )
    assert_refused(rig, "RootExpiredError", not_kept=M2)  # root v1 expired at NOW + 30 days


def test_expired_root_metadata_offered_by_the_server_is_refused(
    rig: Rig, srv: FakeServer, trust: Trust
) -> None:
    v2 = trust.v2_env(revoke_k1=False, expires_in=timedelta(days=-1))
    t = target(make_manifest(M2, release=2, model_version=2), [trust.k2], srv.add("m2", M2), (v2,))
    assert rig.updater.handle_target(t).value == "refused"
    assert_refused(rig, "RootExpiredError", not_kept=M2)


def test_oversized_download_is_cut_off_while_streaming(
    rig: Rig, srv: FakeServer, trust: Trust
) -> None:
    """The host streams the artifact and then 256 MiB more without a Content-Length."""
    srv.mode = "oversize"
    srv.oversize_extra = 256 * 1024 * 1024
    t = target(make_manifest(M2, release=2, model_version=2), [trust.k1], srv.add("m2", M2))
    assert rig.updater.handle_target(t).value == "refused"
    assert_refused(rig, "LengthError", not_kept=M2)
    entry = srv.requests_for("m2")[-1]
    wait_until(lambda: entry.get("aborted"), timeout=60)  # the device hung up on the host
    # What the host managed to push is the signed size plus what the kernel's socket buffers
    # absorbed before the device stopped reading: far below what it tried to send.
    assert entry["sent"] < len(M2) + 32 * 1024 * 1024
    part = rig.store.part_path(sha256(M2))
    assert not part.exists() or part.stat().st_size <= len(M2)


def test_mix_and_match_of_two_releases_is_refused(rig: Rig, srv: FakeServer, trust: Trust) -> None:
    a = make_manifest(M2, release=2, model_version=2)
    b = make_manifest(M3, release=3, model_version=3)
    env_a = a.sign([trust.k1])
    env_b = b.sign([trust.k1])
    url_a, url_b = srv.add("a", M2), srv.add("b", M3)
    cases = {
        # B's genuine envelope, the artifact location (and bytes) of A.
        "HashMismatchError": TargetMessage(a.model_line, env_b.to_dict(), url_a),
    }
    # A's payload with B's artifact fields, keeping A's signature.
    spliced = json.loads(env_a.payload)
    spliced["artifact"] = json.loads(env_b.payload)["artifact"]
    payload = json.dumps(spliced, sort_keys=True, separators=(",", ":")).encode()
    forged_fields = SignedEnvelope(env_a.payload_type, payload, env_a.signatures)
    # B's signature on A's payload.
    swapped_sig = SignedEnvelope(env_a.payload_type, env_a.payload, env_b.signatures)
    for name, env in (("fields", forged_fields), ("signature", swapped_sig)):
        cases[f"SignatureInvalidError/{name}"] = TargetMessage(a.model_line, env.to_dict(), url_b)
    for expected, t in cases.items():
        assert rig.updater.handle_target(t).value == "refused", expected
        assert_refused(rig, expected.split("/")[0], not_kept=M3)
    assert not rig.store.has_model(sha256(M2))
    assert rig.updater.highest_release == 1


@pytest.mark.parametrize(
    ("targeting", "error"),
    [
        (Targeting(device_ids=("dev-2", "dev-3")), "TargetingMismatchError"),
        (Targeting(groups=("canary",)), "TargetingMismatchError"),
        (Targeting(hardware_classes=("jetson-orin",)), "TargetingMismatchError"),
        (Targeting(opset=99), "RuntimeIncompatibleError"),
        (Targeting(min_runtime_version="99.0"), "RuntimeIncompatibleError"),
    ],
)
def test_release_for_another_device_or_hardware_is_refused(
    rig: Rig, srv: FakeServer, trust: Trust, targeting: Targeting, error: str
) -> None:
    m = replace(make_manifest(M2, release=2, model_version=2), targeting=targeting)
    assert rig.updater.handle_target(target(m, [trust.k1], srv.add("m2", M2))).value == "refused"
    assert_refused(rig, error, not_kept=M2)
    assert srv.requests_for("m2") == []


def test_matching_targeting_is_accepted(tmp_path: Path, srv: FakeServer, trust: Trust) -> None:
    """The counterpart: the same checks let the intended device through."""
    rig = device(tmp_path / "s", trust, groups=["canary"], hardware="jetson-orin")
    try:
        tg = Targeting(
            device_ids=("dev-1",), groups=("canary", "eu"), hardware_classes=("jetson-orin",),
            opset=13, min_runtime_version="1.0",
        )  # fmt: skip
        m = replace(make_manifest(M1, release=1, model_version=1), targeting=tg)
        assert rig.updater.handle_target(target(m, [trust.k1], srv.add("m1", M1))).value == (
            "committed"
        )
    finally:
        rig.close()


def test_revoked_online_key_is_refused(rig: Rig, srv: FakeServer, trust: Trust) -> None:
    v2 = trust.v2_env(revoke_k1=True)
    # Root v2 arrives with a release signed by K1, the key it revokes: refused at once.
    t = target(make_manifest(M2, release=2, model_version=2), [trust.k1], srv.add("m2", M2), (v2,))
    assert rig.updater.handle_target(t).value == "refused"
    assert_refused(rig, "RevokedKeyError", not_kept=M2)
    assert rig.updater.root_version == 2  # the root was learned (and persisted) anyway
    # A later, higher release signed by the revoked key, without any root: still refused.
    t3 = target(make_manifest(M3, release=3, model_version=3), [trust.k1], srv.add("m3", M3))
    assert rig.updater.handle_target(t3).value == "refused"
    assert_refused(rig, "RevokedKeyError", not_kept=M3)


def test_online_key_rotated_without_touching_the_device(
    rig: Rig, srv: FakeServer, trust: Trust, tmp_path: Path
) -> None:
    v2 = trust.v2_env(revoke_k1=True)
    t = target(make_manifest(M2, release=2, model_version=2), [trust.k2], srv.add("m2", M2), (v2,))
    assert rig.updater.handle_target(t).value == "committed"
    assert rig.serving_version() == 2 and rig.updater.root_version == 2
    # Persisted in trust.json, which no download writes; a restart keeps root v2 and serves.
    stored = json.loads((tmp_path / "state" / "trust.json").read_bytes())["roots"]
    assert [Root.from_payload(base64.b64decode(e["payload"])).version for e in stored] == [2]
    rig.close()
    again = device(tmp_path / "state", trust)
    try:
        assert again.updater.root_version == 2
        loaded = again.updater.resume()
        assert loaded is not None and loaded.model_version == 2
        t3 = target(make_manifest(M3, release=3, model_version=3), [trust.k2], srv.add("m3", M3))
        assert again.updater.handle_target(t3).value == "committed"
    finally:
        again.close()


def test_a_root_not_signed_by_the_trusted_root_keys_is_refused(
    rig: Rig, srv: FakeServer, trust: Trust
) -> None:
    """An attacker who stole the online key cannot mint root v2 to entrench a key of its own."""
    thief = Ed25519PrivateKey.generate()
    forged = next_root(trust.v1, now=NOW, ttl_days=30, add_release=[thief.public_key()])
    for signers in ([trust.k1], [thief], [trust.k1, thief]):
        env = forged.sign(signers).to_dict()
        t = target(
            make_manifest(M2, release=2, model_version=2), [thief], srv.add("m2", M2), (env,)
        )
        assert rig.updater.handle_target(t).value == "refused"
        assert_refused(rig, "RootInvalidError", not_kept=M2)
    assert rig.updater.root_version == 1
    assert not (rig.store.trust_path).exists()


def test_threshold_root_needs_k_of_n_signatures(tmp_path: Path, srv: FakeServer) -> None:
    """Root v1 with a 2-of-3 root role: v2 signed by one root key is refused, by two accepted."""
    roots = [Ed25519PrivateKey.generate() for _ in range(3)]
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    v1 = new_root(
        [r.public_key() for r in roots], [k1.public_key()], threshold=2, now=NOW, ttl_days=30
    )
    rig = Rig(tmp_path / "s", k1, trusted_root=v1.sign(roots[:2]).to_json(), trusted_keys=[])
    try:
        v2 = next_root(v1, now=NOW, ttl_days=30, add_release=[k2.public_key()])
        m = make_manifest(M1, release=1, model_version=1)
        one = target(m, [k2], srv.add("m1", M1), (v2.sign(roots[2:]).to_dict(),))
        assert rig.updater.handle_target(one).value == "refused"
        assert rig.reports[-1].reason.startswith("RootInvalidError:")
        assert "2 required" in rig.reports[-1].reason
        two = target(m, [k2], srv.add("m1", M1), (v2.sign([roots[0], roots[2]]).to_dict(),))
        assert rig.updater.handle_target(two).value == "committed"
        assert rig.updater.root_version == 2
    finally:
        rig.close()
