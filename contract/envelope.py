"""Signed envelopes: DSSE (Dead Simple Signing Envelope, as used by in-toto and Sigstore).

The signature covers the exact payload bytes, never a re-serialisation, so any Ed25519 library can
verify an envelope: decode ``payload`` from base64, build PAE(payloadType, payload), verify each
signature over it with the pinned public key, and only then parse the payload as JSON.

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

LEN is the decimal byte length, SP one ASCII space. ``keyid`` is the lowercase hex sha256 of the
32-byte raw Ed25519 public key. This module is pure: bytes in, verified bytes out, or an exception.

Verification goes through ``contract.ed25519`` and never imports ``cryptography`` (a device only
verifies); signing imports it inside the functions that sign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contract._errors import SignatureError
from contract.ed25519 import VerifyKey, as_verify_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from contract.ed25519 import PublicKeyLike

PAYLOAD_TYPE = "application/vnd.edgeloop.manifest+json"

# An envelope is a few KiB; anything far larger is an attack or a bug, refused before parsing.
MAX_ENVELOPE_BYTES = 1024 * 1024  # bytes


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: the exact bytes that are signed."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def key_id(public_key: PublicKeyLike) -> str:
    """Stable identifier of a public key: hex sha256 of its 32 raw bytes."""
    return hashlib.sha256(as_verify_key(public_key).raw).hexdigest()


def load_public_key(pem: bytes) -> VerifyKey:
    """Load an Ed25519 public key from PEM (SubjectPublicKeyInfo). Raises SignatureError."""
    return VerifyKey.from_pem(pem)


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """Load an unencrypted Ed25519 private key from PEM (PKCS#8). Signing side only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("private key is not Ed25519")
    return key


@dataclass(frozen=True)
class SignedEnvelope:
    """A DSSE envelope: ``payload`` is the raw signed bytes (base64 only on the wire)."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, raw 64-byte signature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signatures": [
                {"keyid": kid, "sig": base64.b64encode(sig).decode("ascii")}
                for kid, sig in self.signatures
            ],
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any) -> SignedEnvelope:
        """Parse the wire form. Raises SignatureError on any structural problem."""
        if not isinstance(data, Mapping):
            raise SignatureError("envelope must be a JSON object")
        payload_type = data.get("payloadType")
        if not isinstance(payload_type, str):
            raise SignatureError("envelope.payloadType must be a string")
        try:
            payload = base64.b64decode(data.get("payload", ""), validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise SignatureError("envelope.payload is not valid base64") from exc
        sigs = data.get("signatures")
        if not isinstance(sigs, list) or not sigs:
            raise SignatureError("envelope.signatures must be a non-empty list")
        parsed: list[tuple[str, bytes]] = []
        for entry in sigs:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("keyid"), str):
                raise SignatureError("each signature needs a string keyid")
            try:
                sig = base64.b64decode(entry.get("sig", ""), validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise SignatureError("signature is not valid base64") from exc
            parsed.append((entry["keyid"], sig))
        return cls(payload_type, payload, tuple(parsed))

    @classmethod
    def from_json(cls, raw: bytes | str) -> SignedEnvelope:
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise SignatureError(f"envelope is {len(raw)} bytes, limit {MAX_ENVELOPE_BYTES}")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SignatureError(f"envelope is not JSON: {exc}") from exc
        return cls.from_dict(data)


def sign_payload(
    payload: bytes, keys: Iterable[Ed25519PrivateKey], payload_type: str = PAYLOAD_TYPE
) -> SignedEnvelope:
    """Sign ``payload`` with every key given and return the envelope."""
    message = pae(payload_type, payload)
    sigs = tuple((key_id(k.public_key()), k.sign(message)) for k in keys)
    if not sigs:
        raise SignatureError("at least one signing key is required")
    return SignedEnvelope(payload_type, payload, sigs)


def verify_envelope(
    envelope: SignedEnvelope,
    trusted: Iterable[PublicKeyLike],
    *,
    threshold: int = 1,
    payload_type: str = PAYLOAD_TYPE,
) -> bytes:
    """Return the payload bytes if at least ``threshold`` distinct trusted keys signed them.

    Raises:
        SignatureError: wrong payload type, or fewer valid signatures than ``threshold``.
    """
    if envelope.payload_type != payload_type:
        raise SignatureError(
            f"payload type {envelope.payload_type!r} is not the expected {payload_type!r}"
        )
    by_id = {key_id(k): k for k in map(as_verify_key, trusted)}
    message = pae(envelope.payload_type, envelope.payload)
    valid: set[str] = set()
    for kid, sig in envelope.signatures:
        key = by_id.get(kid)
        if key is None or kid in valid or not key.verify(sig, message):
            continue
        valid.add(kid)
    if len(valid) < threshold:
        known = ", ".join(sorted(k[:12] for k, _ in envelope.signatures))
        raise SignatureError(
            f"{len(valid)} valid signature(s) from trusted keys, {threshold} required "
            f"(signed by keyids: {known or 'none'})"
        )
    return envelope.payload
