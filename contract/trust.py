"""Root of trust: offline root metadata that certifies the online release keys.

Devices pin only root version 1. Root metadata is the payload of a DSSE envelope whose
``payloadType`` is ``application/vnd.edgeloop.root+json``::

    {"_type": "edgeloop/root", "spec_version": 1, "version": 2,
     "expires_at": "2027-12-02T00:00:00Z",
     "keys": {"<keyid>": {"keytype": "ed25519", "public": "<64 hex chars: raw 32-byte key>"}},
     "roles": {"root": {"keyids": ["..."], "threshold": 1},
               "release": {"keyids": ["..."], "threshold": 1}}}

Rules (TUF's root rotation, simplified; the full algorithm is in docs/bundle-format.md):

- ``keyid`` = lowercase hex sha256 of the raw 32-byte Ed25519 public key (checked on parse).
- Version 1 is trusted because it is pinned; it must still be signed by its own root threshold.
- Version N+1 is accepted only when signed by a threshold of version N's ``root`` role AND a
  threshold of its own ``root`` role. Versions are never skipped.
- Release manifests must be signed by a threshold of the current root's ``release`` role. A key
  is rotated or revoked by publishing the next root version without it; devices are untouched.
- Only the newest root's expiry matters; intermediate roots may have expired.

This module is pure: envelopes and ``now`` in, a verified ``Root`` out, or ``RootError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from contract._errors import RootError, SignatureError
from contract.ed25519 import VerifyKey, as_verify_key
from contract.envelope import SignedEnvelope, key_id, sign_payload, verify_envelope
from contract.manifest import format_time

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from contract.ed25519 import PublicKeyLike

ROOT_PAYLOAD_TYPE = "application/vnd.edgeloop.root+json"
ROOT_TYPE = "edgeloop/root"
ROOT_SPEC_VERSION = 1
ROLES = ("root", "release")
MAX_KEYS = 64  # keys one root may list
MAX_CHAIN = 1024  # root versions one walk may apply
# Allowance for device clocks running behind/ahead: metadata counts as expired only once
# ``now`` is past ``expires_at`` + this many seconds. Documented in docs/bundle-format.md.
CLOCK_SKEW_S = 300
_HEX32 = re.compile(r"^[0-9a-f]{64}$")


def public_hex(key: PublicKeyLike) -> str:
    """The 64 hex characters of a public key's raw bytes, as root metadata lists it."""
    return as_verify_key(key).raw.hex()


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise RootError(message)


def is_expired(expires_at: datetime, now: datetime, skew_s: float = CLOCK_SKEW_S) -> bool:
    """The one expiry rule for all signed metadata (roots and manifests)."""
    return now > expires_at + timedelta(seconds=skew_s)


@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class Root:
    """Verified (or about to be verified) root metadata.

    ``keys`` may be given as any ``PublicKeyLike`` (the server passes ``cryptography`` keys); they
    are held as VerifyKey.
    """

    version: int
    expires_at: datetime
    keys: Mapping[str, PublicKeyLike]  # keyid -> key (held as VerifyKey)
    roles: Mapping[str, Role]

    def __post_init__(self) -> None:
        keys = {kid: as_verify_key(k) for kid, k in self.keys.items()}
        object.__setattr__(self, "keys", keys)

    def role_keys(self, role: str) -> list[VerifyKey]:
        return [as_verify_key(self.keys[k]) for k in self.roles[role].keyids]

    def threshold(self, role: str) -> int:
        return self.roles[role].threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": ROOT_TYPE,
            "spec_version": ROOT_SPEC_VERSION,
            "version": self.version,
            "expires_at": format_time(self.expires_at),
            "keys": {
                kid: {"keytype": "ed25519", "public": public_hex(k)} for kid, k in self.keys.items()
            },
            "roles": {
                name: {"keyids": list(r.keyids), "threshold": r.threshold}
                for name, r in self.roles.items()
            },
        }

    def to_payload(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, UTF-8."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    def sign(self, keys: Iterable[Ed25519PrivateKey]) -> SignedEnvelope:
        return sign_payload(self.to_payload(), keys, payload_type=ROOT_PAYLOAD_TYPE)

    @classmethod
    def from_payload(cls, payload: bytes) -> Root:
        """Parse root payload bytes (signatures are checked by the callers). Raises RootError."""
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RootError(f"root payload is not JSON: {exc}") from exc
        _require(isinstance(data, dict), "root metadata must be a JSON object")
        _require(data.get("_type") == ROOT_TYPE, f"root _type must be {ROOT_TYPE!r}")
        _require(
            data.get("spec_version") == ROOT_SPEC_VERSION,
            f"unsupported root spec_version {data.get('spec_version')!r}",
        )
        version = data.get("version")
        _require(
            isinstance(version, int) and not isinstance(version, bool) and version >= 1,
            "root version must be an integer >= 1",
        )
        expires = data.get("expires_at")
        _require(isinstance(expires, str), "root expires_at must be an RFC 3339 string")
        try:
            expires_at = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError as exc:
            raise RootError(f"root expires_at is not an RFC 3339 time: {expires!r}") from exc
        _require(expires_at.tzinfo is not None, "root expires_at must carry a time zone")
        raw_keys = data.get("keys")
        _require(
            isinstance(raw_keys, dict) and 0 < len(raw_keys) <= MAX_KEYS,
            f"root keys must be an object of 1..{MAX_KEYS} keys",
        )
        keys: dict[str, VerifyKey] = {}
        for kid, entry in raw_keys.items():
            _require(
                isinstance(entry, dict)
                and entry.get("keytype") == "ed25519"
                and isinstance(entry.get("public"), str)
                and bool(_HEX32.match(entry["public"])),
                f"root key {kid[:12]}: keytype must be ed25519, public 64 hex chars",
            )
            try:
                key = VerifyKey.from_raw(bytes.fromhex(entry["public"]))
            except SignatureError as exc:
                raise RootError(f"root key {kid[:12]}: {exc}") from exc
            _require(key_id(key) == kid, f"root key {kid[:12]}: keyid is not sha256(public)")
            keys[kid] = key
        raw_roles = data.get("roles")
        _require(isinstance(raw_roles, dict), "root roles must be an object")
        roles: dict[str, Role] = {}
        for name in ROLES:
            role = raw_roles.get(name)
            _require(isinstance(role, dict), f"root roles.{name} is missing")
            kids, threshold = role.get("keyids"), role.get("threshold")
            _require(
                isinstance(kids, list)
                and bool(kids)
                and len(set(kids)) == len(kids)
                and all(isinstance(k, str) and k in keys for k in kids),
                f"roles.{name}.keyids must be distinct keyids listed in keys",
            )
            _require(
                isinstance(threshold, int)
                and not isinstance(threshold, bool)
                and 1 <= threshold <= len(kids),
                f"roles.{name}.threshold must be 1..{len(kids)}",
            )
            roles[name] = Role(tuple(kids), threshold)
        return cls(version, expires_at.astimezone(UTC), keys, roles)


def as_envelope(envelope: SignedEnvelope | bytes | str | Mapping[str, Any]) -> SignedEnvelope:
    try:
        if isinstance(envelope, bytes | str):
            return SignedEnvelope.from_json(envelope)
        if isinstance(envelope, SignedEnvelope):
            return envelope
        return SignedEnvelope.from_dict(envelope)
    except SignatureError as exc:
        raise RootError(f"root envelope: {exc}") from exc


def _signed_by(env: SignedEnvelope, root: Root, what: str) -> None:
    try:
        verify_envelope(
            env,
            root.role_keys("root"),
            threshold=root.threshold("root"),
            payload_type=ROOT_PAYLOAD_TYPE,
        )
    except SignatureError as exc:
        raise RootError(f"root v{what}: {exc}") from exc


def load_pinned_root(envelope: SignedEnvelope | bytes | str | Mapping[str, Any]) -> Root:
    """The root a device was provisioned with: trusted by pinning, but it must be
    self-consistent (signed by a threshold of its own root role)."""
    env = as_envelope(envelope)
    if env.payload_type != ROOT_PAYLOAD_TYPE:
        raise RootError(f"payload type {env.payload_type!r} is not {ROOT_PAYLOAD_TYPE!r}")
    root = Root.from_payload(env.payload)
    _signed_by(env, root, f"{root.version} (self)")
    return root


def verify_root_update(
    trusted: Root, envelope: SignedEnvelope | bytes | str | Mapping[str, Any]
) -> Root:
    """Accept root ``trusted.version + 1`` if both the old and the new root role signed it.

    Raises:
        RootError: malformed, wrong version, or a threshold missing.
    """
    env = as_envelope(envelope)
    if env.payload_type != ROOT_PAYLOAD_TYPE:
        raise RootError(f"payload type {env.payload_type!r} is not {ROOT_PAYLOAD_TYPE!r}")
    new = Root.from_payload(env.payload)
    if new.version != trusted.version + 1:
        raise RootError(f"root v{new.version} does not follow trusted root v{trusted.version}")
    _signed_by(env, trusted, f"{new.version} by the keys of root v{trusted.version}")
    _signed_by(env, new, f"{new.version} by its own keys")
    return new


def root_version(envelope: Mapping[str, Any] | SignedEnvelope) -> int:
    """The version an (unverified) root envelope claims; 0 when unreadable. Used only to sort."""
    try:
        data = json.loads(as_envelope(envelope).payload)
        version = data.get("version") if isinstance(data, dict) else None
    except (RootError, ValueError):
        return 0
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def walk_root_chain(
    trusted: Root, envelopes: Sequence[Mapping[str, Any] | SignedEnvelope]
) -> tuple[Root, list[Mapping[str, Any] | SignedEnvelope]]:
    """Apply every root newer than ``trusted``, in version order, one version at a time.

    Returns the newest root and the envelopes applied (for persisting). Envelopes at or below
    the trusted version are ignored (already known); a gap or a bad signature raises RootError.
    """
    newer = sorted((e for e in envelopes if root_version(e) > trusted.version), key=root_version)
    if len(newer) > MAX_CHAIN:
        raise RootError(f"{len(newer)} root versions offered, limit {MAX_CHAIN}")
    current, applied = trusted, []
    for env in newer:
        if root_version(env) == current.version:
            continue  # duplicate of one just applied
        current = verify_root_update(current, env)
        applied.append(env)
    return current, applied


__all__ = [
    "CLOCK_SKEW_S",
    "ROOT_PAYLOAD_TYPE",
    "Role",
    "Root",
    "is_expired",
    "load_pinned_root",
    "public_hex",
    "root_version",
    "verify_root_update",
    "walk_root_chain",
]
