"""Ed25519 key handling and release signing.

The online signing key signs release manifests; it is trusted by devices only because the
newest root metadata (server.release.trust) lists it in its ``release`` role. ``load_signer``
checks that at startup: development creates or extends the root chain, production refuses to start.

A release is one signed manifest. Release numbers are allocated with an atomic
``UPDATE model_lines SET last_release = last_release + 1 ... RETURNING`` (the row lock serialises
concurrent signers) and ``UNIQUE(line, release)`` is the backstop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from contract import (
    ArtifactRef,
    ContractError,
    InputSpec,
    Manifest,
    SignedEnvelope,
    key_id,
    load_private_key,
)
from contract.manifest import Targeting
from contract.trust import Root
from server.core.config import Settings
from server.core.errors import ConfigError, ConflictError, NotFoundError
from server.db import audit
from server.db.audit import AuditRecord
from server.db.registry import ModelLine, ModelVersion, Release
from server.release.targeting import model_opset
from server.release.trust import (
    DEV_ROOT_DIR,
    TrustChain,
    load_chain,
    load_root_keys,
    new_root,
    next_root,
    write_root,
)

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model.onnx"


@dataclass(frozen=True)
class Signer:
    """The online signing key."""

    key: Ed25519PrivateKey
    chain: TrustChain | None = None  # the root chain that certifies ``key``

    @property
    def roots(self) -> tuple[dict[str, Any], ...]:
        """Root envelopes newer than v1, sent with every target (empty without a chain)."""
        return self.chain.after_pin() if self.chain is not None else ()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, manifest: Manifest) -> SignedEnvelope:
        return manifest.sign([self.key])


def write_key_pair(private_path: Path, key: Ed25519PrivateKey | None = None) -> Path:
    """Write ``key`` (or a new one) as PKCS#8 PEM (mode 0600) and its public key beside it.

    Returns the public key path (``<stem>.pub.pem``).
    """
    key = key or Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = private_path.with_name(private_path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, private_path)
    pub_path = private_path.with_name(private_path.stem + ".pub.pem")
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub_path


def ensure_trust(
    trust_dir: Path,
    *,
    release_key: Ed25519PublicKey,
    production: bool,
    now: datetime,
    ttl_days: int,
) -> TrustChain:
    """Load the root chain; in development create (or extend) it so ``release_key`` is trusted.

    Raises:
        ConfigError: production without a root chain, or whose newest root does not list the
            online key (sign a new root offline with ``edgeloop keys sign-root``).
    """
    chain = load_chain(trust_dir)
    kid = key_id(release_key)
    if chain is not None and chain.allows_release_key(kid):
        return chain
    if production:
        if chain is None:
            raise ConfigError(
                f"no root metadata in {trust_dir}: production refuses to generate a root "
                "(create it offline with `edgeloop keys init-root` and copy 1.root.json there)"
            )
        raise ConfigError(
            f"the online signing key {kid[:12]} is not in the release role of root "
            f"v{chain.latest.version}: sign a new root with `edgeloop keys sign-root`"
        )
    dev_key_path = trust_dir / DEV_ROOT_DIR / "root-1.pem"
    if not dev_key_path.exists():
        if chain is not None:
            raise ConfigError(
                f"online key {kid[:12]} not in root v{chain.latest.version} and no dev root key"
            )
        write_key_pair(dev_key_path)
    (root_key,) = load_root_keys([dev_key_path])
    if chain is None:
        root = new_root(
            [root_key.public_key()], [release_key], threshold=1, now=now, ttl_days=ttl_days
        )
    else:
        root = next_root(chain.latest, now=now, ttl_days=ttl_days, add_release=[release_key])
    write_root(trust_dir, root.sign([root_key]), root.version)
    log.warning(
        "development: generated root v%d in %s with the dev root key %s; in production the root "
        "key is kept OFFLINE (edgeloop keys init-root) and never on the server",
        root.version,
        trust_dir,
        dev_key_path,
    )
    chain = load_chain(trust_dir)
    assert chain is not None
    return chain


def load_signer(settings: Settings, *, now: datetime | None = None) -> Signer:
    """Load the signing key; in development create one if it is missing.

    Raises:
        ConfigError: production without a key file, or the file is not an Ed25519 key.
    """
    path = settings.signing_key_file
    if not path.exists():
        if settings.environment == "production":
            raise ConfigError(
                f"no signing key at {path}: production refuses to generate one "
                "(create it with `edgeloop keys init` and set EDGELOOP_SIGNING_KEY_PATH)"
            )
        write_key_pair(path)
    try:
        key = load_private_key(path.read_bytes())
    except (OSError, ContractError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {exc}") from exc
    chain = ensure_trust(
        settings.trust_dir_path,
        release_key=key.public_key(),
        production=settings.environment == "production",
        now=now or datetime.now(UTC),
        ttl_days=settings.root_ttl_days,
    )
    return Signer(key, chain)


def sign_release(
    session: Session,
    *,
    signer: Signer,
    line_name: str,
    model_version: int,
    now: datetime,
    ttl_days: int,
    deployment: str = "serve",
    targeting: Targeting | None = None,
) -> Release:
    """Sign a new release of ``line_name`` carrying ``model_version``; flushes, does not commit.

    ``deployment`` "shadow" signs a release devices run beside the champion and never serve.
    ``targeting`` (a rollout's audience) is signed as given, plus the model's own opset when
    its training report records one (``server.release.targeting.model_opset``), so a device
    whose runtime cannot run it refuses. Without either the payload has no ``targeting``.

    Raises:
        NotFoundError: unknown line or version.
        ConflictError: the version has no stored artifact.
    """
    version = session.scalar(
        select(ModelVersion).where(
            ModelVersion.line == line_name, ModelVersion.version == model_version
        )
    )
    if version is None:
        raise NotFoundError(f"model line {line_name!r} has no version {model_version}")
    if version.sha256 is None or version.size is None:
        raise ConflictError(f"version {model_version} of {line_name!r} has no artifact")
    audit.lock(session)  # before the line's row lock: the audit lock always comes first
    number = session.scalar(
        update(ModelLine)
        .where(ModelLine.name == line_name)
        .values(last_release=ModelLine.last_release + 1)
        .returning(ModelLine.last_release)
        .execution_options(synchronize_session=False)
    )
    if number is None:
        raise NotFoundError(f"unknown model line {line_name!r}")
    line = session.get(ModelLine, line_name, populate_existing=True)
    assert line is not None
    challenger = (version.metrics or {}).get("challenger") or {}
    extra: dict[str, Any] = {
        "trainer": version.trainer,
        "dataset_version": version.dataset_version,
        "metrics": {k: v for k, v in challenger.items() if isinstance(v, int | float)},
    }
    manifest = Manifest(
        model_line=line_name,
        release=int(number),
        model_version=model_version,
        artifact=ArtifactRef(name=ARTIFACT_NAME, sha256=version.sha256, size=version.size),
        input_spec=InputSpec.from_dict(line.input_spec),
        labels=tuple(line.labels),
        created_at=now,
        expires_at=now + timedelta(days=ttl_days),
        extra=extra,
        targeting=replace(targeting or Targeting(), opset=model_opset(version.report)),
        deployment=deployment,
    )
    row = Release(
        line=line_name,
        release=int(number),
        model_version=model_version,
        sha256=version.sha256,
        envelope=signer.sign(manifest).to_dict(),
        created_at=now,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor="server",
        action="release.sign",
        subject=f"{line_name}@{int(number)}",
        details={
            "model_version": model_version,
            "sha256": version.sha256,
            "deployment": deployment,
            # only when signed: older audit records keep their shape
            **(
                {"targeting": manifest.targeting.to_dict()}
                if manifest.targeting != Targeting()
                else {}
            ),
        },
        now=now,
    )
    return row


def release_first_champion(
    session: Session,
    *,
    signer: Signer,
    line_name: str,
    model_version: int,
    now: datetime,
    ttl_days: int,
) -> Release:
    """Sign the release of a line's first champion and make it the line's current release.

    There is no model to roll out from, so it goes to every device of the line at once (the
    caller holds the line's row lock). Flushes, does not commit.
    """
    release = sign_release(
        session,
        signer=signer,
        line_name=line_name,
        model_version=model_version,
        now=now,
        ttl_days=ttl_days,
    )
    line = session.get(ModelLine, line_name)
    assert line is not None
    line.champion_version = model_version
    line.current_release = release.release
    return release


def audit_published_roots(session: Session, signer: Signer, *, now: datetime) -> int:
    """Record ``root.publish`` (and ``key.rotate`` when the release keys changed) once per root
    version the server serves; commits nothing. Returns the number of versions recorded."""
    if signer.chain is None:
        return 0
    audit.lock(session)  # check and append under the one append lock
    seen = set(
        session.scalars(
            select(AuditRecord.subject).where(AuditRecord.action == "root.publish")
        ).all()
    )
    recorded = 0
    previous: Root | None = None
    for root in signer.chain.roots:
        subject = f"root:{root.version}"
        if subject not in seen:
            release = root.roles["release"]
            audit.record(
                session,
                actor="system",
                action="root.publish",
                subject=subject,
                details={
                    "release_keyids": list(release.keyids),
                    "root_threshold": root.threshold("root"),
                    "expires_at": root.expires_at.isoformat(),
                },
                now=now,
            )
            if previous is not None:
                old = set(previous.roles["release"].keyids)
                new = set(release.keyids)
                if old != new:
                    audit.record(
                        session,
                        actor="system",
                        action="key.rotate",
                        subject=subject,
                        details={"added": sorted(new - old), "revoked": sorted(old - new)},
                        now=now,
                    )
            recorded += 1
        previous = root
    return recorded
