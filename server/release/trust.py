"""The server's root chain: offline root metadata certifying the online release key(s).

Layout of the trust directory (``Settings.trust_dir_path``, default ``data_dir/trust``)::

    1.root.json, 2.root.json, ...   root metadata envelopes (contract.trust), one per version
    dev-root/root-1.pem              development only: the generated root key (keep OFFLINE in
                                     production: root keys never live on the server)

The server only reads and serves root metadata; it never needs a root private key in production.
Operators create and extend the chain offline with ``edgeloop keys init-root`` and
``edgeloop keys sign-root`` (the pure functions ``new_root`` / ``next_root`` below), copy the new
``<version>.root.json`` into the trust directory and restart; devices learn it with their next
target and from then on accept manifests signed by the keys it lists.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import ContractError, RootError, SignedEnvelope, key_id, load_private_key
from contract.trust import Role, Root, load_pinned_root, verify_root_update
from server.core.errors import ConfigError

if TYPE_CHECKING:
    from contract.ed25519 import PublicKeyLike

log = logging.getLogger(__name__)
ROOT_FILE = re.compile(r"^([1-9][0-9]{0,8})\.root\.json$")
DEV_ROOT_DIR = "dev-root"


@dataclass(frozen=True)
class TrustChain:
    """Every root version from 1 to the newest, verified in order."""

    roots: tuple[Root, ...]
    envelopes: tuple[dict[str, Any], ...]  # SignedEnvelope.to_dict(), same order

    @property
    def latest(self) -> Root:
        return self.roots[-1]

    def envelope(self, version: int) -> dict[str, Any] | None:
        if 1 <= version <= len(self.envelopes):
            return self.envelopes[version - 1]
        return None

    def after_pin(self) -> tuple[dict[str, Any], ...]:
        """Roots newer than version 1: what a target message carries (they are small)."""
        return self.envelopes[1:]

    def allows_release_key(self, kid: str) -> bool:
        return kid in self.latest.roles["release"].keyids


def root_path(trust_dir: Path, version: int) -> Path:
    return trust_dir / f"{version}.root.json"


def load_chain(trust_dir: Path) -> TrustChain | None:
    """Read and verify ``<n>.root.json`` files; None when there are none.

    Raises:
        ConfigError: a gap in the versions, or a root that does not verify against the previous.
    """
    if not trust_dir.is_dir():
        return None
    found: dict[int, Path] = {}
    for p in trust_dir.iterdir():
        m = ROOT_FILE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        return None
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise ConfigError(f"root versions in {trust_dir} must be 1..N without gaps: {versions}")
    roots: list[Root] = []
    envelopes: list[dict[str, Any]] = []
    for v in versions:
        try:
            env = SignedEnvelope.from_json(found[v].read_bytes())
            root = load_pinned_root(env) if v == 1 else verify_root_update(roots[-1], env)
        except (OSError, ContractError) as exc:
            raise ConfigError(f"{found[v]}: {exc}") from exc
        if root.version != v:
            raise ConfigError(f"{found[v]} holds root version {root.version}")
        roots.append(root)
        envelopes.append(env.to_dict())
    return TrustChain(tuple(roots), tuple(envelopes))


def new_root(
    root_keys: Sequence[PublicKeyLike],
    release_keys: Sequence[PublicKeyLike],
    *,
    threshold: int,
    now: datetime,
    ttl_days: int,
    release_threshold: int = 1,
) -> Root:
    """Root version 1. Raises RootError for an impossible threshold."""
    return _root(1, root_keys, release_keys, threshold, release_threshold, now, ttl_days)


def next_root(
    current: Root,
    *,
    now: datetime,
    ttl_days: int,
    add_release: Iterable[PublicKeyLike] = (),
    revoke: Iterable[str] = (),
    root_keys: Sequence[PublicKeyLike] | None = None,
    threshold: int | None = None,
) -> Root:
    """The next root version: release keys added/revoked (by keyid prefix), optionally new root
    keys. Rotation = add the new online key (and revoke the old one).

    Raises:
        RootError: a revoke prefix matches no release key, or no release key would remain.
    """
    release = {kid: current.keys[kid] for kid in current.roles["release"].keyids}
    for prefix in revoke:
        hits = [k for k in release if k.startswith(prefix)]
        if len(hits) != 1:
            raise RootError(f"revoke {prefix!r} matches {len(hits)} release keys, need exactly 1")
        del release[hits[0]]
    for k in add_release:
        release[key_id(k)] = k
    if not release:
        raise RootError("the new root would list no release key")
    roots = list(root_keys) if root_keys else current.role_keys("root")
    thr = threshold if threshold is not None else current.threshold("root")
    return _root(
        current.version + 1,
        roots,
        list(release.values()),
        thr,
        min(current.threshold("release"), len(release)),
        now,
        ttl_days,
    )


def _root(
    version: int,
    root_keys: Sequence[PublicKeyLike],
    release_keys: Sequence[PublicKeyLike],
    threshold: int,
    release_threshold: int,
    now: datetime,
    ttl_days: int,
) -> Root:
    keys = {key_id(k): k for k in [*root_keys, *release_keys]}
    root_ids = tuple(dict.fromkeys(key_id(k) for k in root_keys))
    release_ids = tuple(dict.fromkeys(key_id(k) for k in release_keys))
    if not 1 <= threshold <= len(root_ids):
        raise RootError(f"root threshold {threshold} needs 1..{len(root_ids)} root keys")
    if not 1 <= release_threshold <= len(release_ids):
        raise RootError(f"release threshold {release_threshold} needs 1..{len(release_ids)}")
    return Root(
        version=version,
        expires_at=now + timedelta(days=ttl_days),
        keys=keys,
        roles={
            "root": Role(root_ids, threshold),
            "release": Role(release_ids, release_threshold),
        },
    )


def write_root(trust_dir: Path, envelope: SignedEnvelope, version: int) -> Path:
    """Write ``<version>.root.json``; refuses to overwrite a published version."""
    trust_dir.mkdir(parents=True, exist_ok=True)
    path = root_path(trust_dir, version)
    if path.exists():
        raise ConfigError(f"{path} exists: a published root version is never rewritten")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(envelope.to_json())
    tmp.replace(path)
    return path


def load_root_keys(paths: Iterable[Path]) -> list[Ed25519PrivateKey]:
    try:
        return [load_private_key(Path(p).read_bytes()) for p in paths]
    except (OSError, ContractError) as exc:
        raise ConfigError(f"cannot load root key: {exc}") from exc


def root_json(root: Root) -> str:
    return json.dumps(root.to_dict(), indent=1, sort_keys=True)
