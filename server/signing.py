"""Ed25519 key handling and release signing.

A release is one signed manifest. Release numbers are allocated with an atomic
``UPDATE model_lines SET last_release = last_release + 1 ... RETURNING`` (the row lock serialises
concurrent signers) and ``UNIQUE(line, release)`` is the backstop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
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
from server.core.config import Settings
from server.db import ModelLine, ModelVersion, Release
from server.errors import ConfigError, ConflictError, NotFoundError

ARTIFACT_NAME = "model.onnx"


@dataclass(frozen=True)
class Signer:
    """The online signing key."""

    key: Ed25519PrivateKey

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


def load_signer(settings: Settings) -> Signer:
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
        return Signer(load_private_key(path.read_bytes()))
    except (OSError, ContractError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {exc}") from exc


def sign_release(
    session: Session,
    *,
    signer: Signer,
    line_name: str,
    model_version: int,
    now: datetime,
    ttl_days: int,
) -> Release:
    """Sign a new release of ``line_name`` carrying ``model_version``; flushes, does not commit.

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
    return row
