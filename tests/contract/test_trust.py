"""The pure root-of-trust core (contract.trust) and the targeting fields of the manifest."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import ManifestError, RootError, key_id
from contract.envelope import SignedEnvelope, sign_payload
from contract.manifest import Manifest, Targeting
from contract.trust import (
    ROOT_PAYLOAD_TYPE,
    Role,
    Root,
    is_expired,
    load_pinned_root,
    verify_root_update,
    walk_root_chain,
)

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def make_root(version: int, root_keys, release_keys, threshold: int = 1) -> Root:
    all_keys = {key_id(k.public_key()): k.public_key() for k in [*root_keys, *release_keys]}
    return Root(
        version=version,
        expires_at=NOW + timedelta(days=30),
        keys=all_keys,
        roles={
            "root": Role(tuple(key_id(k.public_key()) for k in root_keys), threshold),
            "release": Role(tuple(key_id(k.public_key()) for k in release_keys), 1),
        },
    )


def test_round_trip_and_pinned_root_must_be_self_signed() -> None:
    (r,), (k,) = keys(1), keys(1)
    root = make_root(1, [r], [k])
    got = load_pinned_root(root.sign([r]).to_json())
    assert got.to_payload() == root.to_payload()
    assert [key_id(x) for x in got.role_keys("release")] == [key_id(k.public_key())]
    with pytest.raises(RootError, match="valid signature"):
        load_pinned_root(root.sign([k]).to_json())  # signed by a key outside the root role


def test_next_version_needs_old_and_new_root_role() -> None:
    (old,), (new,), (k,) = keys(1), keys(1), keys(1)
    v1 = make_root(1, [old], [k])
    v2 = make_root(2, [new], [k])  # root key rotation
    assert verify_root_update(v1, v2.sign([old, new])).version == 2
    for signers in ([old], [new]):
        with pytest.raises(RootError, match="valid signature"):
            verify_root_update(v1, v2.sign(signers))


def test_versions_are_never_skipped_or_repeated() -> None:
    (r,), (k,) = keys(1), keys(1)
    v1 = make_root(1, [r], [k])
    for version in (1, 3):
        with pytest.raises(RootError, match="does not follow"):
            verify_root_update(v1, make_root(version, [r], [k]).sign([r]))


def test_k_of_n_threshold() -> None:
    rs, (k,) = keys(3), keys(1)
    v1 = make_root(1, rs, [k], threshold=2)
    v2 = make_root(2, rs, [k], threshold=2)
    with pytest.raises(RootError, match="2 required"):
        verify_root_update(v1, v2.sign([rs[0]]))
    with pytest.raises(RootError, match="2 required"):
        verify_root_update(v1, v2.sign([rs[0], rs[0]]))  # the same key twice counts once
    assert verify_root_update(v1, v2.sign([rs[0], rs[2]])).version == 2


def test_walk_applies_in_order_ignores_known_and_stops_at_a_gap() -> None:
    (r,), (k,) = keys(1), keys(1)
    v1 = make_root(1, [r], [k])
    envs = [make_root(v, [r], [k]).sign([r]).to_dict() for v in (2, 3, 4)]
    newest, applied = walk_root_chain(v1, [envs[2], envs[0], envs[1], v1.sign([r]).to_dict()])
    assert newest.version == 4 and len(applied) == 3
    with pytest.raises(RootError, match="does not follow"):
        walk_root_chain(v1, [envs[0], envs[2]])


def test_malformed_root_metadata_is_refused() -> None:
    (r,), (k,) = keys(1), keys(1)
    good = make_root(1, [r], [k]).to_dict()
    kid = next(iter(good["keys"]))
    mutations = [
        ("_type", lambda d: d.update(_type="edgeloop/other")),
        ("keyid", lambda d: d["keys"].update({"0" * 64: d["keys"][kid]})),
        ("threshold", lambda d: d["roles"]["root"].update(threshold=2)),
        ("keyids", lambda d: d["roles"]["release"].update(keyids=["f" * 64])),
        ("roles.release", lambda d: d["roles"].pop("release")),
        ("expires_at", lambda d: d.update(expires_at="tomorrow")),
    ]
    for name, mutate in mutations:
        d = json.loads(json.dumps(good))
        mutate(d)
        payload = json.dumps(d, sort_keys=True).encode()
        with pytest.raises(RootError):
            load_pinned_root(sign_payload(payload, [r], payload_type=ROOT_PAYLOAD_TYPE))
            pytest.fail(f"mutated {name} was accepted")


def test_a_manifest_envelope_is_not_root_metadata() -> None:
    (r,), (k,) = keys(1), keys(1)
    root = make_root(1, [r], [k])
    env = sign_payload(root.to_payload(), [r])  # manifest payload type
    with pytest.raises(RootError, match="payload type"):
        load_pinned_root(env)


def test_expiry_allows_a_bounded_clock_skew() -> None:
    t = NOW
    assert not is_expired(t, t + timedelta(seconds=299), 300)
    assert is_expired(t, t + timedelta(seconds=301), 300)
    assert is_expired(t, t + timedelta(seconds=1), 0)


def test_targeting_round_trips_and_is_validated(signing_key) -> None:
    from tests.device_agent.agent_testkit import make_manifest, make_model

    m = replace(
        make_manifest(make_model(1), release=1, model_version=1),
        targeting=Targeting(("d1",), ("g",), ("hw",), 13, "1.17"),
    )
    parsed = Manifest.from_payload(m.to_payload())
    assert parsed.targeting == m.targeting
    d = json.loads(m.to_payload())
    d.pop("targeting")
    assert Manifest.from_payload(json.dumps(d).encode()).targeting == Targeting()
    for bad in ({"opset": 0}, {"groups": "g"}, {"min_runtime_version": "new"}, {"device_ids": [1]}):
        d["targeting"] = bad
        with pytest.raises(ManifestError, match="targeting"):
            Manifest.from_payload(json.dumps(d).encode())


def test_spec_page_example_verifies_with_the_contract() -> None:
    """The worked example of docs/bundle-format.md also passes edgeloop's own verifier."""
    from pathlib import Path

    from contract.manifest import verify_manifest

    doc = (Path(__file__).parents[2] / "docs" / "bundle-format.md").read_text()

    def block(name: str) -> str:
        return doc.split(f"<!-- example:{name} -->", 1)[1].split("```json", 1)[1].split("```")[0]

    root = load_pinned_root(block("root"))
    env = SignedEnvelope.from_json(block("manifest"))
    m = verify_manifest(
        env, root.role_keys("release"), now=datetime(2026, 12, 15, tzinfo=UTC), threshold=1
    )
    assert (m.release, m.targeting.groups, m.targeting.opset) == (7, ("canary",), 13)
    payload = base64.b64decode(json.loads(block("manifest"))["payload"])
    canonical = json.dumps(json.loads(payload), sort_keys=True, separators=(",", ":")).encode()
    assert payload == canonical  # the example payload is in canonical form
