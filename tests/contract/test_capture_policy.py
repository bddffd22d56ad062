"""The signed capture policy: what verifies, and the exact error for what does not."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import MessageError, SignatureError
from contract.capture_policy import (
    MAX_POLICY_BYTES,
    POLICY_PAYLOAD_TYPE,
    CapturePolicy,
    verify_policy,
)
from contract.envelope import PAYLOAD_TYPE, SignedEnvelope, sign_payload

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def policy(**changes: object) -> CapturePolicy:
    base = CapturePolicy(
        model_line="digits",
        group="hall-1",
        seq=7,
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        raised=True,
        uncertain_below=0.6,
        sample_rate=0.25,
        max_per_hour=30,
        max_per_day=200,
        alert_id=3,
        reason="drift alert 3",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def wire(p: CapturePolicy, key: Ed25519PrivateKey) -> bytes:
    return p.sign([key]).to_json()


def test_a_signed_policy_verifies_and_round_trips(signing_key: Ed25519PrivateKey) -> None:
    got = verify_policy(wire(policy(), signing_key), [signing_key.public_key()], now=NOW)
    assert got == policy()
    assert got.to_dict()["type"] == "edgeloop/capture-policy"


def test_forged_tampered_and_foreign_envelopes_are_refused(
    signing_key: Ed25519PrivateKey,
) -> None:
    trusted = [signing_key.public_key()]
    with pytest.raises(SignatureError, match="0 valid signature"):
        verify_policy(wire(policy(), Ed25519PrivateKey.generate()), trusted, now=NOW)
    env = json.loads(wire(policy(), signing_key))
    raised = policy(sample_rate=1.0, max_per_hour=10_000).to_payload()
    env["payload"] = base64.b64encode(raised).decode()  # the signature covers the old bytes
    with pytest.raises(SignatureError, match="0 valid signature"):
        verify_policy(json.dumps(env).encode(), trusted, now=NOW)
    # A release manifest's envelope type cannot be replayed as a policy, nor the other way.
    as_manifest = sign_payload(policy().to_payload(), [signing_key], payload_type=PAYLOAD_TYPE)
    with pytest.raises(SignatureError, match="payload type"):
        verify_policy(as_manifest.to_json(), trusted, now=NOW)
    assert POLICY_PAYLOAD_TYPE != PAYLOAD_TYPE


def test_expired_oversized_and_malformed_policies_are_refused(
    signing_key: Ed25519PrivateKey,
) -> None:
    trusted = [signing_key.public_key()]
    with pytest.raises(MessageError, match="expired at 2030-01-01T01:00:00Z"):
        verify_policy(wire(policy(), signing_key), trusted, now=NOW + timedelta(hours=2))
    # Within the clock skew a device allows, it still holds.
    verify_policy(
        wire(policy(), signing_key), trusted, now=NOW + timedelta(hours=1, seconds=30), skew_s=60
    )
    with pytest.raises(MessageError, match=f"limit {MAX_POLICY_BYTES}"):
        verify_policy(b" " * (MAX_POLICY_BYTES + 1), trusted, now=NOW)
    with pytest.raises(MessageError, match="nests"):
        verify_policy(b"[" * 64 + b"]" * 64, trusted, now=NOW)
    with pytest.raises(SignatureError, match="envelope must be a JSON object"):
        verify_policy(b"[]", trusted, now=NOW)
    with pytest.raises(MessageError, match="not JSON"):
        verify_policy(b"\x00garbage", trusted, now=NOW)
    for bad, why in (
        ({"sample_rate": 1.5}, "sample_rate must lie in"),
        ({"max_per_hour": -1}, "max_per_hour must lie in"),
        ({"group": "a/b"}, "group must be"),
        ({"expires_at": NOW + timedelta(days=30)}, "expires_at must be"),
        ({"expires_at": NOW}, "expires_at must be"),
    ):
        with pytest.raises(MessageError, match=why):
            policy(**bad).sign([signing_key])  # the issuer refuses to sign it
        payload = json.dumps({**policy().to_dict(), **policy(**bad).to_dict()}).encode()
        forged = SignedEnvelope.from_dict(
            sign_payload(payload, [signing_key], payload_type=POLICY_PAYLOAD_TYPE).to_dict()
        )
        with pytest.raises(MessageError, match=why):
            verify_policy(forged.to_json(), trusted, now=NOW)
