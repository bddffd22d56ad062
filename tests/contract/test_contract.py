"""The wire contract: envelopes, manifests and messages refuse every malformed or forged input."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import (
    ArtifactRef,
    DeviceState,
    InputSpec,
    Manifest,
    ManifestError,
    MessageError,
    MetricsReport,
    SignatureError,
    SignedEnvelope,
    StatusReport,
    TargetMessage,
    Topics,
    decode_input,
    encode_input,
    key_id,
    pae,
    verify_manifest,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def make_manifest(**over) -> Manifest:
    fields = dict(
        model_line="digits",
        release=3,
        model_version=2,
        artifact=ArtifactRef("model.onnx", hashlib.sha256(b"x").hexdigest(), 1),
        input_spec=InputSpec("input", (-1, 64), "float32", 0.0, 1.0),
        labels=tuple(str(i) for i in range(10)),
        created_at=NOW,
        expires_at=NOW + timedelta(days=30),
    )
    fields.update(over)
    return Manifest(**fields)


def test_sign_and_verify_round_trip(signing_key):
    env = make_manifest().sign([signing_key])
    got = verify_manifest(env.to_json(), [signing_key.public_key()], now=NOW)
    assert got == make_manifest()


def test_signature_covers_exact_pae_bytes(signing_key):
    """A third party verifies with only the documented PAE and an Ed25519 library."""
    wire = json.loads(make_manifest().sign([signing_key]).to_json())
    payload = base64.b64decode(wire["payload"])
    sig = base64.b64decode(wire["signatures"][0]["sig"])
    message = b"DSSEv1 %d %s %d %s" % (
        len(wire["payloadType"]),
        wire["payloadType"].encode(),
        len(payload),
        payload,
    )
    assert message == pae(wire["payloadType"], payload)
    signing_key.public_key().verify(sig, message)  # raises if wrong
    assert wire["signatures"][0]["keyid"] == key_id(signing_key.public_key())


def test_unknown_key_is_refused(signing_key):
    env = make_manifest().sign([Ed25519PrivateKey.generate()])
    with pytest.raises(SignatureError, match="0 valid signature"):
        verify_manifest(env, [signing_key.public_key()], now=NOW)


def test_tampered_payload_is_refused(signing_key):
    wire = json.loads(make_manifest().sign([signing_key]).to_json())
    payload = base64.b64decode(wire["payload"]).replace(b'"release":3', b'"release":9')
    wire["payload"] = base64.b64encode(payload).decode()
    with pytest.raises(SignatureError):
        verify_manifest(wire, [signing_key.public_key()], now=NOW)


def test_threshold_counts_distinct_trusted_keys(signing_key):
    other = Ed25519PrivateKey.generate()
    trusted = [signing_key.public_key(), other.public_key()]
    env = make_manifest().sign([signing_key])
    doubled = SignedEnvelope(env.payload_type, env.payload, env.signatures * 2)
    with pytest.raises(SignatureError, match="2 required"):
        verify_manifest(doubled, trusted, now=NOW, threshold=2)
    both = make_manifest().sign([signing_key, other])
    assert verify_manifest(both, trusted, now=NOW, threshold=2).release == 3


def test_expired_manifest_is_refused(signing_key):
    env = make_manifest().sign([signing_key])
    with pytest.raises(ManifestError, match="expired"):
        verify_manifest(env, [signing_key.public_key()], now=NOW + timedelta(days=31))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"{}",
        b'{"payloadType":"x","payload":"!!","signatures":[]}',
        b'{"payloadType":"x","payload":"","signatures":[{"keyid":1}]}',
        b"\xff\xfe",
    ],
)
def test_malformed_envelopes_raise_signature_error(raw, signing_key):
    with pytest.raises(SignatureError):
        verify_manifest(raw, [signing_key.public_key()], now=NOW)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(release=0),
        lambda d: d.update(release="3"),
        lambda d: d.update(model_line="a/b"),
        lambda d: d["artifact"].update(sha256="zz"),
        lambda d: d["artifact"].update(size=-1),
        lambda d: d["input_spec"].update(dtype="complex64"),
        lambda d: d["input_spec"].update(shape=[]),
        lambda d: d.update(labels=[]),
        lambda d: d.update(expires_at="yesterday"),
        lambda d: d.update(spec_version=99),
        lambda d: d.pop("artifact"),
    ],
)
def test_signed_but_invalid_manifest_raises_manifest_error(mutate, signing_key):
    data = make_manifest().to_dict()
    mutate(data)
    from contract import sign_payload

    env = sign_payload(json.dumps(data).encode(), [signing_key])
    with pytest.raises(ManifestError):
        verify_manifest(env, [signing_key.public_key()], now=NOW)


def test_messages_round_trip_and_validate():
    s = StatusReport("dev-1", 1.5, DeviceState.COMMITTED, "digits", 2, 3, rollout_id=7)
    assert StatusReport.from_dict(s.to_json()) == s
    m = MetricsReport("dev-1", 2.0, "digits", 2, 5.0, 10, 0, 8, 7, 0.2, 0.4)
    assert MetricsReport.from_dict(m.to_json()) == m
    t = TargetMessage("digits", {"payloadType": "x"}, "http://a/b", 4)
    assert TargetMessage.from_dict(t.to_json()) == t
    with pytest.raises(MessageError, match="state"):
        StatusReport.from_dict({**s.to_dict(), "state": "exploded"})
    with pytest.raises(MessageError, match="correct must not exceed labelled"):
        MetricsReport.from_dict({**m.to_dict(), "correct": 9})
    with pytest.raises(MessageError, match="device_id"):
        StatusReport.from_dict({**s.to_dict(), "device_id": "a/#"})
    with pytest.raises(MessageError, match="model_version"):
        MetricsReport.from_dict({**m.to_dict(), "model_version": True})
    with pytest.raises(MessageError, match="not JSON"):
        StatusReport.from_dict(b"{nope")


def test_input_encoding_checks_length():
    x = np.linspace(0, 1, 64, dtype=np.float32)
    assert np.array_equal(decode_input(encode_input(x), 64), x)
    with pytest.raises(MessageError, match="expects 64"):
        decode_input(encode_input(x[:10]), 64)
    with pytest.raises(MessageError, match="base64"):
        decode_input("%%%%", 64)


def test_topics_parse_only_our_device_topics():
    t = Topics()
    assert t.parse(t.status("dev-1")) == ("dev-1", "status")
    assert t.parse("edgeloop/v1/devices/dev-1/other") is None
    assert t.parse("other/devices/dev-1/status") is None
    assert t.parse("edgeloop/v1/devices/a/b/status") is None
