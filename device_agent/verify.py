"""Pure verification core: bytes and trusted keys in, a verified manifest out, or a ContentError.

Nothing here touches the network or the clock; the updater injects ``now`` and the persisted
``highest_release``. Contract errors are translated into the agent's ContentError family.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from contract import ManifestError, SignatureError
from contract.envelope import SignedEnvelope, load_public_key, verify_envelope
from contract.manifest import ArtifactRef, Manifest, verify_manifest
from contract.messages import TargetMessage
from device_agent.errors import (
    ExpiredManifestError,
    HashMismatchError,
    LengthError,
    ManifestInvalidError,
    ModelLineMismatchError,
    RollbackRefusedError,
    SignatureInvalidError,
)
from device_agent.store import sha256_file


def load_trusted_keys(pems: Iterable[bytes]) -> list[Ed25519PublicKey]:
    """Parse the PEM public keys the device trusts. Raises SignatureInvalidError."""
    try:
        return [load_public_key(p) for p in pems]
    except SignatureError as exc:
        raise SignatureInvalidError(str(exc)) from exc


def _signed_manifest(
    envelope: Mapping[str, Any], trusted: list[Ed25519PublicKey], threshold: int
) -> Manifest:
    """Signature check and parse only (no expiry). Raises a ContentError."""
    try:
        payload = verify_envelope(SignedEnvelope.from_dict(envelope), trusted, threshold=threshold)
    except SignatureError as exc:
        raise SignatureInvalidError(str(exc)) from exc
    try:
        return Manifest.from_payload(payload)
    except ManifestError as exc:
        raise ManifestInvalidError(str(exc)) from exc


def verify_target(
    target: TargetMessage,
    trusted: list[Ed25519PublicKey],
    *,
    model_line: str,
    highest_release: int,
    now: datetime,
    threshold: int = 1,
) -> Manifest:
    """Decide whether a target may be installed.

    Raises:
        SignatureInvalidError: not signed by enough trusted keys.
        ManifestInvalidError: the signed payload is not a valid manifest.
        ExpiredManifestError: the manifest expired before ``now``.
        ModelLineMismatchError: target or manifest is for another model line.
        RollbackRefusedError: release below ``highest_release``.
    """
    if target.model_line != model_line:
        raise ModelLineMismatchError(
            f"target is for model line {target.model_line!r}, this device serves {model_line!r}"
        )
    try:
        manifest = verify_manifest(target.envelope, trusted, now=now, threshold=threshold)
    except SignatureError as exc:
        raise SignatureInvalidError(str(exc)) from exc
    except ManifestError as exc:
        # Tell "expired" apart from "invalid": both are ManifestError in the contract.
        signed = _signed_manifest(target.envelope, trusted, threshold)
        if signed.is_expired(now):
            raise ExpiredManifestError(str(exc)) from exc
        raise ManifestInvalidError(str(exc)) from exc
    if manifest.model_line != model_line:
        raise ModelLineMismatchError(
            f"manifest is for model line {manifest.model_line!r}, this device serves {model_line!r}"
        )
    if manifest.release < highest_release:
        raise RollbackRefusedError(
            f"release {manifest.release} is lower than release {highest_release} already accepted"
        )
    return manifest


def verify_installed(
    envelope: Mapping[str, Any],
    trusted: list[Ed25519PublicKey],
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
    manifest = _signed_manifest(envelope, trusted, threshold)
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
