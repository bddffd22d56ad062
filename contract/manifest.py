"""The model manifest: what a signed release tells a device to run.

A manifest is the payload of a DSSE envelope (``contract.envelope``). Fields:

- ``model_line``: the model family (e.g. ``digits``); a device serves exactly one line.
- ``release``: monotonic per model line. A device refuses a release lower than the highest it has
  accepted, so an old, validly signed manifest cannot be replayed. An operator rollback is a *new*
  release that points at the old model's bytes.
- ``model_version``: which trained model the release carries (registry version number).
- ``artifact``: name, exact size in bytes and sha256 of the ONNX file. The download location is a
  hint outside the signature; trust comes only from this hash.
- ``input_spec``: tensor name, shape (``-1`` = batch), dtype and value range of the model's input.
- ``labels``: class names in output order.
- ``targeting``: which devices may install it (device ids, groups, hardware classes; an empty
  list matches any) and what runtime it needs (``opset``: highest ONNX default-domain opset the
  model imports; ``min_runtime_version``: lowest ONNX Runtime version, dotted ints). Optional in
  the payload; absent means "any device".
- ``created_at`` / ``expires_at``: RFC 3339 UTC; a device refuses an expired manifest.
- ``deployment``: optional, ``"serve"`` (default: install and serve) or ``"shadow"`` (run the
  model beside the serving one and report how it compares; never serve its answers). Signed,
  so nothing outside the signature can make a device serve a shadow release.

The agent applies no preprocessing: the input tensor is fed as given, so ``input_spec`` is the
whole input contract. Self-test vectors travel inside the ONNX file (metadata
``edgeloop.selftest``), so the artifact's sha256 covers them. The full format is in
docs/bundle-format.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from contract._errors import ManifestError
from contract.envelope import SignedEnvelope, sign_payload, verify_envelope

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from contract.ed25519 import PublicKeyLike

MANIFEST_TYPE = "edgeloop/model-manifest"
# Every model has an output of this name: float32 [batch, len(labels)], class probabilities.
OUTPUT_NAME = "probabilities"
SPEC_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DTYPES = {"float32", "float64", "uint8", "int64"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


def _parse_time(value: Any, name: str) -> datetime:
    _require(isinstance(value, str), f"{name} must be an RFC 3339 string")
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ManifestError(f"{name} is not an RFC 3339 time: {value!r}") from exc
    _require(ts.tzinfo is not None, f"{name} must carry a time zone")
    return ts.astimezone(UTC)


def format_time(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    sha256: str
    size: int  # bytes

    @classmethod
    def from_dict(cls, data: Any) -> ArtifactRef:
        _require(isinstance(data, Mapping), "artifact must be an object")
        name, sha, size = data.get("name"), data.get("sha256"), data.get("size")
        _require(isinstance(name, str) and bool(_NAME.match(name)), "artifact.name is invalid")
        _require(isinstance(sha, str) and bool(_SHA256.match(sha)), "artifact.sha256 is invalid")
        _require(
            isinstance(size, int) and not isinstance(size, bool) and size > 0,
            "artifact.size must be a positive integer",
        )
        return cls(name=name, sha256=sha, size=size)


DEPLOYMENTS = ("serve", "shadow")  # how a device runs the release's model


def _deployment(value: Any) -> str:
    _require(value in DEPLOYMENTS, f"deployment must be one of: {', '.join(DEPLOYMENTS)}")
    return str(value)


_VERSION = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,6}){0,3}$")
MAX_TARGET_ENTRIES = 10_000  # ids/groups/classes one targeting list may hold


def _str_list(data: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = data.get(name, [])
    _require(
        isinstance(value, list)
        and len(value) <= MAX_TARGET_ENTRIES
        and all(isinstance(x, str) and x for x in value),
        f"targeting.{name} must be a list of non-empty strings (at most {MAX_TARGET_ENTRIES})",
    )
    return tuple(value)


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.20.1' -> (1, 20, 1); anything after the numeric prefix (e.g. '.dev0') is ignored."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = re.match(r"^[0-9]+", piece)
        if digits is None:
            break
        parts.append(int(digits.group(0)))
    return tuple(parts)


@dataclass(frozen=True)
class Targeting:
    """Who may install a release. Every non-empty criterion must match (logical AND)."""

    device_ids: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # matches when the device is in at least one of them
    hardware_classes: tuple[str, ...] = ()
    opset: int | None = None  # highest ONNX default-domain opset the model imports
    min_runtime_version: str | None = None  # lowest ONNX Runtime version, e.g. "1.17"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_ids": list(self.device_ids),
            "groups": list(self.groups),
            "hardware_classes": list(self.hardware_classes),
            "opset": self.opset,
            "min_runtime_version": self.min_runtime_version,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Targeting:
        _require(isinstance(data, Mapping), "targeting must be an object")
        opset, runtime = data.get("opset"), data.get("min_runtime_version")
        _require(
            opset is None or (isinstance(opset, int) and not isinstance(opset, bool) and opset > 0),
            "targeting.opset must be a positive integer or null",
        )
        _require(
            runtime is None or (isinstance(runtime, str) and bool(_VERSION.match(runtime))),
            "targeting.min_runtime_version must be dotted integers (e.g. 1.17) or null",
        )
        return cls(
            device_ids=_str_list(data, "device_ids"),
            groups=_str_list(data, "groups"),
            hardware_classes=_str_list(data, "hardware_classes"),
            opset=opset,
            min_runtime_version=runtime,
        )


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # -1 marks the batch dimension
    dtype: str
    min: float
    max: float

    @property
    def features(self) -> int:
        """Number of values in one sample (product of the non-batch dimensions)."""
        n = 1
        for d in self.shape:
            if d != -1:
                n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> InputSpec:
        _require(isinstance(data, Mapping), "input_spec must be an object")
        name, shape, dtype = data.get("name"), data.get("shape"), data.get("dtype")
        lo, hi = data.get("min"), data.get("max")
        _require(isinstance(name, str) and bool(name), "input_spec.name must be a string")
        _require(
            isinstance(shape, list)
            and bool(shape)
            and all(isinstance(d, int) and (d > 0 or d == -1) for d in shape),
            "input_spec.shape must be a list of positive ints (or -1 for the batch)",
        )
        _require(dtype in _DTYPES, f"input_spec.dtype must be one of {sorted(_DTYPES)}")
        _require(
            isinstance(lo, int | float) and isinstance(hi, int | float) and lo < hi,
            "input_spec.min/max must be numbers with min < max",
        )
        return cls(name=name, shape=tuple(shape), dtype=dtype, min=float(lo), max=float(hi))


@dataclass(frozen=True)
class Manifest:
    model_line: str
    release: int
    model_version: int
    artifact: ArtifactRef
    input_spec: InputSpec
    labels: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    extra: dict[str, Any] = field(default_factory=dict)  # informational, e.g. trainer, metrics
    targeting: Targeting = field(default_factory=Targeting)
    deployment: str = "serve"  # one of DEPLOYMENTS; "shadow": run beside, never serve

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "_type": MANIFEST_TYPE,
            "spec_version": SPEC_VERSION,
            "model_line": self.model_line,
            "release": self.release,
            "model_version": self.model_version,
            "artifact": asdict(self.artifact),
            "input_spec": self.input_spec.to_dict(),
            "labels": list(self.labels),
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
            "extra": self.extra,
        }
        if self.targeting != Targeting():  # absent means "any device"
            d["targeting"] = self.targeting.to_dict()
        if self.deployment != "serve":  # absent means "serve": older payloads stay byte-equal
            d["deployment"] = self.deployment
        return d

    def to_payload(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, UTF-8."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    def sign(self, keys: Iterable[Ed25519PrivateKey]) -> SignedEnvelope:
        return sign_payload(self.to_payload(), keys)

    def is_expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    @classmethod
    def from_payload(cls, payload: bytes) -> Manifest:
        """Parse verified payload bytes. Raises ManifestError."""
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest payload is not JSON: {exc}") from exc
        _require(isinstance(data, dict), "manifest must be a JSON object")
        _require(data.get("_type") == MANIFEST_TYPE, f"manifest _type must be {MANIFEST_TYPE!r}")
        _require(
            data.get("spec_version") == SPEC_VERSION,
            f"unsupported manifest spec_version {data.get('spec_version')!r}",
        )
        line = data.get("model_line")
        _require(isinstance(line, str) and bool(_NAME.match(line)), "model_line is invalid")
        release, version = data.get("release"), data.get("model_version")
        for name, val in (("release", release), ("model_version", version)):
            _require(
                isinstance(val, int) and not isinstance(val, bool) and val >= 1,
                f"{name} must be an integer >= 1",
            )
        labels = data.get("labels")
        _require(
            isinstance(labels, list) and bool(labels) and all(isinstance(x, str) for x in labels),
            "labels must be a non-empty list of strings",
        )
        extra = data.get("extra", {})
        _require(isinstance(extra, dict), "extra must be an object")
        created = _parse_time(data.get("created_at"), "created_at")
        expires = _parse_time(data.get("expires_at"), "expires_at")
        _require(expires > created, "expires_at must be after created_at")
        return cls(
            model_line=line,
            release=release,
            model_version=version,
            artifact=ArtifactRef.from_dict(data.get("artifact")),
            input_spec=InputSpec.from_dict(data.get("input_spec")),
            labels=tuple(labels),
            created_at=created,
            expires_at=expires,
            extra=extra,
            targeting=Targeting.from_dict(data.get("targeting", {})),
            deployment=_deployment(data.get("deployment", "serve")),
        )


def verify_manifest(
    envelope: SignedEnvelope | bytes | str | Mapping[str, Any],
    trusted: Iterable[PublicKeyLike],
    *,
    now: datetime,
    threshold: int = 1,
) -> Manifest:
    """Verify signatures, parse, and check expiry. The one way a device accepts a manifest.

    Raises:
        SignatureError: not signed by enough trusted keys, or the envelope is malformed.
        ManifestError: the signed payload is invalid or expired.
    """
    if isinstance(envelope, bytes | str):
        envelope = SignedEnvelope.from_json(envelope)
    elif not isinstance(envelope, SignedEnvelope):
        envelope = SignedEnvelope.from_dict(envelope)
    payload = verify_envelope(envelope, trusted, threshold=threshold)
    manifest = Manifest.from_payload(payload)
    if manifest.is_expired(now):
        raise ManifestError(
            f"manifest for {manifest.model_line} release {manifest.release} expired at "
            f"{format_time(manifest.expires_at)}"
        )
    return manifest


__all__ = [
    "OUTPUT_NAME",
    "ArtifactRef",
    "InputSpec",
    "Manifest",
    "Targeting",
    "verify_manifest",
    "version_tuple",
]
