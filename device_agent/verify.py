"""Pure verification core: bytes and trust in, a verified manifest out, or a ContentError.

Nothing here touches the network or the clock; the updater injects ``now``, the persisted
``highest_release`` and the ``ReleaseTrust`` (which keys may sign releases now, derived from the
pinned root and the root chain learned since; see contract.trust). Contract errors are translated
into the agent's ContentError family.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract import ManifestError, RootError, SignatureError
from contract.ed25519 import VerifyKey, as_verify_key
from contract.envelope import (
    MAX_ENVELOPE_BYTES,
    SignedEnvelope,
    key_id,
    load_public_key,
    verify_envelope,
)
from contract.manifest import ArtifactRef, Manifest, Targeting, format_time, version_tuple
from contract.messages import MAX_JSON_DEPTH, TargetMessage, json_depth
from contract.trust import Root, is_expired, load_pinned_root, root_version, walk_root_chain
from device_agent.errors import (
    ContentError,
    ExpiredManifestError,
    HashMismatchError,
    LengthError,
    ManifestInvalidError,
    ModelLineMismatchError,
    RevokedKeyError,
    RollbackRefusedError,
    RootExpiredError,
    RootInvalidError,
    RuntimeIncompatibleError,
    SignatureInvalidError,
    TargetingMismatchError,
)
from device_agent.store import sha256_file

if TYPE_CHECKING:
    from contract.ed25519 import PublicKeyLike


def load_trusted_keys(pems: Iterable[bytes]) -> list[VerifyKey]:
    """Parse the PEM public keys the device trusts. Raises SignatureInvalidError."""
    try:
        return [load_public_key(p) for p in pems]
    except SignatureError as exc:
        raise SignatureInvalidError(str(exc)) from exc


@dataclass(frozen=True)
class ReleaseTrust:
    """Which keys may sign a release now.

    Root mode: ``roots`` is the verified chain from the pinned root to the newest one; the newest
    root's ``release`` role signs new releases. Legacy mode (``roots`` empty): pinned ``keys``.
    """

    keys: tuple[VerifyKey, ...]
    threshold: int
    roots: tuple[Root, ...] = ()

    @classmethod
    def legacy(cls, pems: Iterable[bytes], threshold: int = 1) -> ReleaseTrust:
        return cls(tuple(load_trusted_keys(pems)), threshold)

    @classmethod
    def from_chain(cls, roots: Sequence[Root]) -> ReleaseTrust:
        newest = roots[-1]
        return cls(tuple(newest.role_keys("release")), newest.threshold("release"), tuple(roots))

    @classmethod
    def pinned(
        cls, pinned: bytes | Mapping[str, Any], learned: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[ReleaseTrust, list[Mapping[str, Any]], str | None]:
        """Trust from the pinned root plus the persisted chain.

        Returns the trust, the learned envelopes that verified (to keep) and, when some did not,
        why (the device then trusts the longest valid prefix). Raises RootInvalidError when the
        pinned root itself is invalid.
        """
        try:
            root = load_pinned_root(pinned)
        except RootError as exc:
            raise RootInvalidError(f"pinned root: {exc}") from exc
        chain, kept, problem = [root], [], None
        for env in sorted(learned, key=_claimed_version):
            try:
                new, applied = walk_root_chain(chain[-1], [env])
            except RootError as exc:
                problem = str(exc)
                break
            if applied:
                chain.append(new)
                kept.append(env)
        return cls.from_chain(chain), kept, problem

    @property
    def root(self) -> Root | None:
        return self.roots[-1] if self.roots else None

    def with_roots(
        self, envelopes: Sequence[Mapping[str, Any]]
    ) -> tuple[ReleaseTrust, list[Mapping[str, Any]]]:
        """Apply root envelopes newer than the current root. Raises RootInvalidError."""
        root = self.root
        if root is None or not envelopes:
            return self, []
        for i, env in enumerate(envelopes):
            check_payload_bounds(env, f"roots[{i}]", RootInvalidError)
        chain = list(self.roots)
        current = root
        applied: list[Mapping[str, Any]] = []
        try:
            for env in sorted(envelopes, key=_claimed_version):
                current, step = walk_root_chain(current, [env])
                if step:
                    chain.append(current)
                    applied.extend(step)  # type: ignore[arg-type]
        except RootError as exc:
            raise RootInvalidError(str(exc)) from exc
        return (ReleaseTrust.from_chain(chain), applied) if applied else (self, [])

    def install_keys(self) -> list[VerifyKey]:
        """Keys that may have signed an install already accepted: every root's release role.
        (Re-verifying persisted installs at start must not brick a device after a rotation.)"""
        if not self.roots:
            return list(self.keys)
        seen: dict[str, VerifyKey] = {}
        for r in self.roots:
            for k in r.role_keys("release"):
                seen[key_id(k)] = k
        return list(seen.values())

    def revoked_keyids(self) -> set[str]:
        """Release keyids an older root listed and the current root dropped."""
        if not self.roots:
            return set()
        now = set(self.roots[-1].roles["release"].keyids)
        return {k for r in self.roots[:-1] for k in r.roles["release"].keyids} - now

    def check_fresh(self, now: datetime, skew_s: float) -> None:
        """Raises RootExpiredError when the newest root expired (TUF: nothing new is trusted)."""
        root = self.root
        if root is not None and is_expired(root.expires_at, now, skew_s):
            raise RootExpiredError(
                f"trusted root v{root.version} expired at {format_time(root.expires_at)}: "
                "waiting for newer root metadata"
            )


def check_payload_bounds(
    envelope: Any, what: str, error: type[ContentError] = SignatureInvalidError
) -> None:
    """Refuse an envelope whose payload is larger than ``MAX_ENVELOPE_BYTES`` or nests deeper
    than ``MAX_JSON_DEPTH``, before any parser sees it (root payloads are parsed before their
    signatures are checked: their version orders the chain). Other shape problems are left to
    the envelope parser. Raises ``error``."""
    if not isinstance(envelope, Mapping):
        raise error(f"{what}: envelope must be a JSON object")
    b64 = envelope.get("payload")
    if not isinstance(b64, str):
        return  # SignedEnvelope.from_dict names the problem
    if len(b64) > (MAX_ENVELOPE_BYTES * 4) // 3 + 4:
        raise error(f"{what}: payload over {MAX_ENVELOPE_BYTES} bytes")
    try:
        payload = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return  # SignedEnvelope.from_dict names the problem
    depth = json_depth(payload)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{what}: payload nests {depth} levels deep, limit {MAX_JSON_DEPTH}")


def _claimed_version(env: Mapping[str, Any]) -> int:
    return root_version(env)


@dataclass(frozen=True)
class DeviceFacts:
    """What a release's signed targeting is matched against."""

    device_id: str
    groups: tuple[str, ...] = ()
    hardware_class: str = "generic"
    max_opset: int = 21
    runtime_version: str = "0"


def check_targeting(targeting: Targeting, device: DeviceFacts) -> None:
    """Raises TargetingMismatchError / RuntimeIncompatibleError when the release is not ours."""
    if targeting.device_ids and device.device_id not in targeting.device_ids:
        raise TargetingMismatchError(
            f"release targets {len(targeting.device_ids)} device id(s), not {device.device_id!r}"
        )
    if targeting.groups and not set(targeting.groups) & set(device.groups):
        raise TargetingMismatchError(
            f"release targets groups {sorted(targeting.groups)[:5]}, device is in "
            f"{sorted(device.groups)[:5]}"
        )
    if targeting.hardware_classes and device.hardware_class not in targeting.hardware_classes:
        raise TargetingMismatchError(
            f"release targets hardware classes {sorted(targeting.hardware_classes)[:5]}, "
            f"device is {device.hardware_class!r}"
        )
    if targeting.opset is not None and targeting.opset > device.max_opset:
        raise RuntimeIncompatibleError(
            f"release needs ONNX opset {targeting.opset}, "
            f"this runtime runs up to {device.max_opset}"
        )
    need = targeting.min_runtime_version
    if need is not None and version_tuple(device.runtime_version) < version_tuple(need):
        raise RuntimeIncompatibleError(
            f"release needs ONNX Runtime >= {need}, this device has {device.runtime_version}"
        )


def _as_trust(trusted: ReleaseTrust | Sequence[PublicKeyLike], threshold: int) -> ReleaseTrust:
    if isinstance(trusted, ReleaseTrust):
        return trusted
    return ReleaseTrust(tuple(as_verify_key(k) for k in trusted), threshold)


def _signed_manifest(
    envelope: Mapping[str, Any], keys: Sequence[VerifyKey], threshold: int, where: str = ""
) -> Manifest:
    """Signature check and parse only (no expiry). Raises a ContentError."""
    try:
        payload = verify_envelope(SignedEnvelope.from_dict(envelope), keys, threshold=threshold)
    except SignatureError as exc:
        raise SignatureInvalidError(f"{exc}{where}") from exc
    try:
        return Manifest.from_payload(payload)
    except ManifestError as exc:
        raise ManifestInvalidError(str(exc)) from exc


def _release_signature(envelope: Mapping[str, Any], trust: ReleaseTrust) -> Manifest:
    root = trust.root
    where = f" (release role of root v{root.version})" if root is not None else ""
    try:
        return _signed_manifest(envelope, trust.keys, trust.threshold, where)
    except SignatureInvalidError as exc:
        revoked = trust.revoked_keyids()
        signers = {
            str(s.get("keyid")) for s in envelope.get("signatures") or [] if isinstance(s, dict)
        }
        hit = sorted(signers & revoked)
        if hit and root is not None:
            raise RevokedKeyError(
                f"signed by release key {hit[0][:12]} which root v{root.version} revoked"
            ) from exc
        raise


def verify_target(
    target: TargetMessage,
    trusted: ReleaseTrust | Sequence[PublicKeyLike],
    *,
    model_line: str,
    highest_release: int,
    now: datetime,
    threshold: int = 1,
    device: DeviceFacts | None = None,
    skew_s: float = 0.0,
) -> Manifest:
    """Decide whether a target may be installed (``trusted`` must already hold the roots the
    target carried: see ``ReleaseTrust.with_roots``).

    Raises:
        RootExpiredError: the newest trusted root expired.
        SignatureInvalidError / RevokedKeyError: not signed by the current release role.
        ManifestInvalidError: the signed payload is not a valid manifest.
        ExpiredManifestError: the manifest expired before ``now`` (+ ``skew_s``).
        ModelLineMismatchError: target or manifest is for another model line.
        TargetingMismatchError / RuntimeIncompatibleError: signed targeting excludes us.
        RollbackRefusedError: release below ``highest_release``.
    """
    trust = _as_trust(trusted, threshold)
    if target.model_line != model_line:
        raise ModelLineMismatchError(
            f"target is for model line {target.model_line!r}, this device serves {model_line!r}"
        )
    trust.check_fresh(now, skew_s)
    check_payload_bounds(target.envelope, "envelope")
    manifest = _release_signature(target.envelope, trust)
    if is_expired(manifest.expires_at, now, skew_s):
        raise ExpiredManifestError(
            f"manifest for {manifest.model_line} release {manifest.release} expired at "
            f"{format_time(manifest.expires_at)}"
        )
    if manifest.model_line != model_line:
        raise ModelLineMismatchError(
            f"manifest is for model line {manifest.model_line!r}, this device serves {model_line!r}"
        )
    if device is not None:
        check_targeting(manifest.targeting, device)
    if manifest.release < highest_release:
        raise RollbackRefusedError(
            f"release {manifest.release} is lower than release {highest_release} already accepted"
        )
    return manifest


def verify_installed(
    envelope: Mapping[str, Any],
    trusted: ReleaseTrust | Sequence[PublicKeyLike],
    *,
    model_line: str,
    sha256: str,
    threshold: int = 1,
) -> Manifest:
    """Re-verify a persisted install at start. Expiry is not checked: a device keeps serving its
    last good model while it cannot reach fresh metadata (it reports instead of going dark).

    Raises:
        ContentError: bad signature, invalid manifest, other line, or sha not the signed one.
    """
    trust = _as_trust(trusted, threshold)
    manifest = _signed_manifest(envelope, trust.install_keys(), trust.threshold)
    if manifest.model_line != model_line:
        raise ModelLineMismatchError(f"persisted manifest is for {manifest.model_line!r}")
    if manifest.artifact.sha256 != sha256:
        raise HashMismatchError("persisted state names an artifact the manifest does not sign")
    return manifest


def verify_artifact(path: Path, artifact: ArtifactRef) -> None:
    """Check a file's size and sha256 against the signed reference.

    Raises:
        LengthError: size differs from the signed size.
        HashMismatchError: sha256 differs from the signed hash.
    """
    size = path.stat().st_size
    if size != artifact.size:
        raise LengthError(f"artifact size is {size} bytes, the signed size is {artifact.size}")
    digest = sha256_file(path)
    if digest != artifact.sha256:
        raise HashMismatchError(
            f"artifact sha256 {digest[:16]}... != signed {artifact.sha256[:16]}..."
        )
