"""``edgeloop keys``: the online signing key (``init``) and the offline root of trust
(``init-root``, ``sign-root``).

These run on the machine that holds the keys; they never talk to a server.

    edgeloop keys init-root --out ROOTDIR --release-key-pub signing.pub.pem [--count 3
        --threshold 2]
        writes ROOTDIR/root-<i>.pem (0600, keep offline) and ROOTDIR/1.root.json
    edgeloop keys sign-root --trust-dir TRUST --root-key ROOTDIR/root-1.pem [--root-key ...]
        [--add-release-key new.pub.pem] [--revoke KEYID_PREFIX]
        writes TRUST/<N+1>.root.json: copy it into the server's trust dir (EDGELOOP_TRUST_DIR)

Rotation: ``keys init DIR`` for a new online key, then ``sign-root --add-release-key
DIR/signing.pub.pem --revoke <old keyid>``, install the new key and root on the server, restart.
Devices learn the new root with their next target; none is re-provisioned.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from contract import ContractError, key_id, load_public_key
from contract.trust import verify_root_update
from server.cli.base import console, err_console
from server.core.errors import ConfigError
from server.release.signing import write_key_pair
from server.release.trust import load_chain, load_root_keys, new_root, next_root, write_root

app = typer.Typer(help="Signing keys.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]{message}[/red]")
    return typer.Exit(1)


def _pub(path: Path):  # noqa: ANN202 - Ed25519PublicKey
    try:
        return load_public_key(path.read_bytes())
    except (OSError, ContractError) as exc:
        raise _fail(f"cannot read public key {path}: {exc}") from exc


@app.command("init")
def keys_init(directory: Path, force: Annotated[bool, typer.Option("--force")] = False) -> None:
    """Generate an Ed25519 signing key (signing.pem) and its public key (signing.pub.pem)."""
    private = directory / "signing.pem"
    if private.exists() and not force:
        err_console.print(f"[red]{private} exists; use --force to replace it[/red]")
        raise typer.Exit(1)
    pub = write_key_pair(private)
    console.print(f"wrote {private} (keep secret) and {pub} (give to devices)")


@app.command("init-root")
def init_root(
    out: Annotated[Path, typer.Option("--out", help="Directory for root keys and 1.root.json.")],
    release_key_pub: Annotated[
        Path, typer.Option("--release-key-pub", help="PEM public key of the online signing key.")
    ],
    count: Annotated[int, typer.Option("--count", min=1, max=16, help="Root keys (n).")] = 1,
    threshold: Annotated[
        int, typer.Option("--threshold", min=1, max=16, help="Root signatures needed (k).")
    ] = 1,
    ttl_days: Annotated[int, typer.Option("--ttl-days", min=1)] = 365,
) -> None:
    """Create n root keys and root v1 (k of n) certifying the online key."""
    if threshold > count:
        raise _fail(f"--threshold {threshold} exceeds --count {count}")
    if (out / "1.root.json").exists():
        raise _fail(f"{out / '1.root.json'} exists: a root is created once")
    keys = []
    for i in range(1, count + 1):
        path = out / f"root-{i}.pem"
        if path.exists():
            raise _fail(f"{path} exists; refusing to overwrite a root key")
        write_key_pair(path)
        keys.append(load_root_keys([path])[0])
    root = new_root(
        [k.public_key() for k in keys],
        [_pub(release_key_pub)],
        threshold=threshold,
        now=datetime.now(UTC),
        ttl_days=ttl_days,
    )
    written = write_root(out, root.sign(keys), 1)
    console.print(
        f"wrote {count} root key(s) root-*.pem (keep OFFLINE) and {written} "
        "(pin it on devices: trusted_root_file; copy it to the server's trust dir)"
    )


@app.command("sign-root")
def sign_root(
    trust_dir: Annotated[Path, typer.Option("--trust-dir", help="Directory of <n>.root.json.")],
    root_key: Annotated[
        list[Path], typer.Option("--root-key", help="Root private key (repeat for k of n).")
    ],
    add_release_key: Annotated[
        list[Path] | None, typer.Option("--add-release-key", help="PEM public key to trust.")
    ] = None,
    revoke: Annotated[
        list[str] | None, typer.Option("--revoke", help="Release keyid (prefix) to drop.")
    ] = None,
    new_root_key: Annotated[
        list[Path] | None,
        typer.Option("--new-root-key", help="Replace the root keys (their private PEMs sign too)."),
    ] = None,
    threshold: Annotated[int | None, typer.Option("--threshold", min=1)] = None,
    ttl_days: Annotated[int, typer.Option("--ttl-days", min=1)] = 365,
) -> None:
    """Sign the next root version: rotate/revoke online keys, or rotate the root keys."""
    try:
        chain = load_chain(trust_dir)
        if chain is None:
            raise _fail(f"no root metadata in {trust_dir}")
        signers = load_root_keys(root_key)
        new_keys = load_root_keys(new_root_key or [])
        root = next_root(
            chain.latest,
            now=datetime.now(UTC),
            ttl_days=ttl_days,
            add_release=[_pub(p) for p in add_release_key or []],
            revoke=revoke or [],
            root_keys=[k.public_key() for k in new_keys] or None,
            threshold=threshold,
        )
        # Old root role and new root role must both reach their thresholds.
        by_id = {key_id(k.public_key()): k for k in [*signers, *new_keys]}
        envelope = root.sign(by_id.values())
        verify_root_update(chain.latest, envelope)  # as a device will, before anything is written
        written = write_root(trust_dir, envelope, root.version)
    except (ConfigError, ContractError) as exc:
        raise _fail(str(exc)) from exc
    release = ", ".join(k[:12] for k in root.roles["release"].keyids)
    console.print(f"wrote {written}: root v{root.version}, release keys {release}")
