"""The signed capture policy: how many uncertain inputs a device group sends back unlabelled.

When a drift alert is raised for a (model line, device group), the server may raise the group's
capture rate so that retraining gets the drifted inputs (which then wait in the labelling queue
for a label). The policy is one small JSON document, signed exactly like a release manifest (a
DSSE envelope, ``contract.envelope``, under its own payload type so that neither can be replayed
as the other) with the online release key the device already trusts through its root chain, and
retained on ``Topics.capture_policy(line, group)``.

Fields:

- ``model_line``, ``group``: whom it is for; ``group`` is a device group or ``"*"`` (the line's
  whole fleet). A device applies only policies of its line and of its groups (or ``"*"``).
- ``seq``: increases with every policy the server issues (all groups share one counter); a
  device refuses a policy whose ``seq`` is not above the last it applied for that group, so an
  old signed policy cannot be replayed.
- ``issued_at`` / ``expires_at``: RFC 3339 UTC. A device refuses an expired policy and falls back
  to its own default when the one it applied expires. A policy may live at most
  ``MAX_POLICY_TTL_S``.
- ``raised``: True for the raised capture policy of an alert; False announces the default (the
  device uses its own configured default: the alert cleared).
- ``uncertain_below``: capture an input whose top-class confidence is below this (0..1).
- ``sample_rate``: probability of capturing such an input (0..1).
- ``max_per_hour`` / ``max_per_day``: captures one device may make; the device bounds them again
  by its own hard maximum, whatever the policy says.
- ``alert_id``, ``reason``: why (for the operator reading a device's status).

Parsing is strict and bounded (``MAX_POLICY_BYTES`` before JSON is parsed, depth, every field);
every refusal is a :class:`~contract.MessageError` or a :class:`~contract.SignatureError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from contract._errors import ManifestError, MessageError
from contract.envelope import SignedEnvelope, sign_payload, verify_envelope
from contract.manifest import _parse_time, format_time
from contract.messages import MAX_REASON_CHARS, clean_text, loads_bounded
from contract.trust import is_expired

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from contract.ed25519 import PublicKeyLike

POLICY_PAYLOAD_TYPE = "application/vnd.edgeloop.capture-policy+json"
POLICY_TYPE = "edgeloop/capture-policy"
ALL_GROUPS = "*"  # the group name of a line's whole fleet (as in monitoring windows)

# Limits (a real policy message is under 1 KiB).
MAX_POLICY_BYTES = 16 * 1024  # bytes, one policy message (envelope JSON) before it is parsed
MAX_POLICY_DEPTH = 4  # nesting levels of the envelope JSON
MAX_POLICY_TTL_S = 7 * 24 * 3600.0  # seconds a policy may live (expires_at - issued_at)
MAX_CAPTURES_PER_HOUR = 10_000  # highest per-device hourly bound a policy may state
MAX_CAPTURES_PER_DAY = 100_000  # highest per-device daily bound a policy may state
MAX_SEQ = 2**63 - 1  # the server's BIGINT id column

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise MessageError(f"capture policy: {message}")


def _probability(d: Mapping[str, Any], name: str) -> float:
    value = d.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MessageError(f"capture policy: {name} must be a number")
    _require(math.isfinite(value) and 0.0 <= value <= 1.0, f"{name} must lie in [0, 1]")
    return float(value)


def _count(d: Mapping[str, Any], name: str, high: int) -> int:
    value = d.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MessageError(f"capture policy: {name} must be an integer")
    _require(0 <= value <= high, f"{name} must lie in 0..{high}")
    return value


@dataclass(frozen=True)
class CapturePolicy:
    """One signed capture policy for a (model line, device group); see the module docstring."""

    model_line: str
    group: str
    seq: int
    issued_at: datetime
    expires_at: datetime
    raised: bool
    uncertain_below: float
    sample_rate: float
    max_per_hour: int
    max_per_day: int
    alert_id: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": POLICY_TYPE,
            "model_line": self.model_line,
            "group": self.group,
            "seq": self.seq,
            "issued_at": format_time(self.issued_at),
            "expires_at": format_time(self.expires_at),
            "raised": self.raised,
            "uncertain_below": self.uncertain_below,
            "sample_rate": self.sample_rate,
            "max_per_hour": self.max_per_hour,
            "max_per_day": self.max_per_day,
            "alert_id": self.alert_id,
            "reason": self.reason,
        }

    def to_payload(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    def sign(self, keys: Iterable[Ed25519PrivateKey]) -> SignedEnvelope:
        """Check the policy (``from_dict`` of its own form), then sign its payload."""
        CapturePolicy.from_dict(self.to_dict())
        return sign_payload(self.to_payload(), keys, payload_type=POLICY_PAYLOAD_TYPE)

    def is_expired(self, now: datetime, skew_s: float = 0.0) -> bool:
        return is_expired(self.expires_at, now, skew_s)

    @classmethod
    def from_dict(cls, d: Any) -> CapturePolicy:
        """Validate every field. Raises MessageError naming the first bad one."""
        _require(isinstance(d, Mapping), "payload must be a JSON object")
        _require(d.get("type") == POLICY_TYPE, f"type must be {POLICY_TYPE!r}")
        line, group = d.get("model_line"), d.get("group")
        _require(isinstance(line, str) and bool(_NAME.match(line)), "model_line is not a name")
        _require(
            isinstance(group, str) and (group == ALL_GROUPS or bool(_NAME.match(group))),
            "group must be a group name or '*'",
        )
        seq = _count(d, "seq", MAX_SEQ)
        try:
            issued = _parse_time(d.get("issued_at"), "issued_at")
            expires = _parse_time(d.get("expires_at"), "expires_at")
        except ManifestError as exc:
            raise MessageError(f"capture policy: {exc}") from exc
        ttl = (expires - issued).total_seconds()
        _require(
            0 < ttl <= MAX_POLICY_TTL_S,
            f"expires_at must be 0-{MAX_POLICY_TTL_S:g} s after issued_at (got {ttl:g} s)",
        )
        raised = d.get("raised")
        _require(isinstance(raised, bool), "raised must be true or false")
        alert_id = d.get("alert_id")
        _require(
            alert_id is None
            or (isinstance(alert_id, int) and not isinstance(alert_id, bool) and alert_id >= 0),
            "alert_id must be a non-negative integer or null",
        )
        reason = d.get("reason", "")
        _require(isinstance(reason, str), "reason must be a string")
        _require(len(reason) <= MAX_REASON_CHARS, f"reason is over {MAX_REASON_CHARS} characters")
        return cls(
            model_line=line,
            group=group,
            seq=seq,
            issued_at=issued,
            expires_at=expires,
            raised=raised,
            uncertain_below=_probability(d, "uncertain_below"),
            sample_rate=_probability(d, "sample_rate"),
            max_per_hour=_count(d, "max_per_hour", MAX_CAPTURES_PER_HOUR),
            max_per_day=_count(d, "max_per_day", MAX_CAPTURES_PER_DAY),
            alert_id=alert_id,
            reason=clean_text(reason),
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> CapturePolicy:
        return cls.from_dict(
            loads_bounded(
                payload,
                max_bytes=MAX_POLICY_BYTES,
                max_depth=MAX_POLICY_DEPTH,
                what="capture policy payload",
            )
        )


def parse_policy_envelope(raw: bytes | bytearray) -> SignedEnvelope:
    """The DSSE envelope a policy message carries, bounded before parsing.

    Raises:
        MessageError: over ``MAX_POLICY_BYTES``, too deep, not JSON.
        SignatureError: not an envelope.
    """
    data = loads_bounded(
        bytes(raw), max_bytes=MAX_POLICY_BYTES, max_depth=MAX_POLICY_DEPTH, what="capture policy"
    )
    return SignedEnvelope.from_dict(data)


def verify_policy(
    raw: bytes | bytearray,
    trusted: Iterable[PublicKeyLike],
    *,
    threshold: int = 1,
    now: datetime,
    skew_s: float = 0.0,
) -> CapturePolicy:
    """Bytes of a policy message in, a verified, unexpired policy out (pure: no I/O).

    Raises:
        MessageError: oversized, malformed, or expired (the reason says which).
        SignatureError: not signed by ``threshold`` of the ``trusted`` keys.
    """
    envelope = parse_policy_envelope(raw)
    payload = verify_envelope(
        envelope, trusted, threshold=threshold, payload_type=POLICY_PAYLOAD_TYPE
    )
    policy = CapturePolicy.from_payload(payload)
    if policy.is_expired(now, skew_s):
        raise MessageError(
            f"capture policy {policy.seq} for group {policy.group!r} expired at "
            f"{format_time(policy.expires_at)}"
        )
    return policy


def policy_ttl(seconds: float) -> timedelta:
    """A policy lifetime within the contract's bound (for the issuer)."""
    return timedelta(seconds=min(max(seconds, 1.0), MAX_POLICY_TTL_S))


__all__ = [
    "ALL_GROUPS",
    "MAX_POLICY_BYTES",
    "MAX_POLICY_TTL_S",
    "POLICY_PAYLOAD_TYPE",
    "CapturePolicy",
    "parse_policy_envelope",
    "policy_ttl",
    "verify_policy",
]
