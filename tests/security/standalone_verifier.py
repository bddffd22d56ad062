"""A third party's bundle verifier, written from docs/bundle-format.md alone.

It uses only the standard library (json, base64, hashlib, datetime) and ``cryptography``; it
never imports edgeloop. Run as ``python -I standalone_verifier.py REQUEST.json``; the request
names the pinned root file, the later root files, the manifest envelope, the artifact file,
the device facts, ``now`` and the release floor. Prints one JSON object
``{"ok": bool, "reason": str, "release": int | null, "modules": [...]}`` and exits 0 (accepted)
or 1 (refused). ``modules`` lists every edgeloop package that got imported (must be empty).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ROOT_TYPE = "application/vnd.edgeloop.root+json"
MANIFEST_TYPE = "application/vnd.edgeloop.manifest+json"
SKEW = timedelta(seconds=300)  # the documented clock-skew allowance


class Refused(Exception):
    pass


def pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode()
    return (
        b"DSSEv1 "
        + str(len(t)).encode()
        + b" "
        + t
        + b" "
        + str(len(payload)).encode()
        + b" "
        + payload
    )


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def signed_by(envelope: dict, payload_type: str, keys: dict, keyids: list, threshold: int) -> bytes:
    """Payload bytes if at least ``threshold`` distinct keyids of ``keyids`` signed PAE."""
    if envelope["payloadType"] != payload_type:
        raise Refused(f"payloadType {envelope['payloadType']!r} is not {payload_type!r}")
    payload = base64.b64decode(envelope["payload"], validate=True)
    message = pae(payload_type, payload)
    good = set()
    for sig in envelope["signatures"]:
        kid = sig["keyid"]
        if kid not in keyids or kid in good:
            continue
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys[kid]["public"]))
        try:
            key.verify(base64.b64decode(sig["sig"], validate=True), message)
        except InvalidSignature:
            continue
        good.add(kid)
    if len(good) < threshold:
        raise Refused(f"{len(good)} valid signatures, {threshold} required")
    return payload


def parse_root(payload: bytes) -> dict:
    root = json.loads(payload)
    if root["_type"] != "edgeloop/root" or root["spec_version"] != 1:
        raise Refused("not edgeloop root metadata v1")
    for kid, entry in root["keys"].items():
        raw = bytes.fromhex(entry["public"])
        if entry["keytype"] != "ed25519" or hashlib.sha256(raw).hexdigest() != kid:
            raise Refused(f"keyid {kid[:12]} is not sha256 of its key")
    return root


def role(root: dict, name: str) -> tuple[list, int]:
    r = root["roles"][name]
    return r["keyids"], r["threshold"]


def verify(req: dict) -> int:
    now = when(req["now"])
    with open(req["pinned_root"], "rb") as fh:
        env = json.load(fh)
    # Step 1: the pinned root must be signed by a threshold of its own root role.
    root = parse_root(base64.b64decode(env["payload"]))
    signed_by(env, ROOT_TYPE, root["keys"], *role(root, "root"))
    # Step 2: walk the chain one version at a time; old AND new root role must sign.
    for path in req["later_roots"]:
        with open(path, "rb") as fh:
            env = json.load(fh)
        new = parse_root(base64.b64decode(env["payload"]))
        if new["version"] != root["version"] + 1:
            raise Refused(f"root v{new['version']} does not follow v{root['version']}")
        signed_by(env, ROOT_TYPE, root["keys"], *role(root, "root"))
        signed_by(env, ROOT_TYPE, new["keys"], *role(new, "root"))
        root = new
    # Step 3: the newest root must not have expired.
    if now > when(root["expires_at"]) + SKEW:
        raise Refused(f"root v{root['version']} expired")
    # Step 4: the manifest, signed by the newest root's release role.
    with open(req["manifest"], "rb") as fh:
        env = json.load(fh)
    payload = signed_by(env, MANIFEST_TYPE, root["keys"], *role(root, "release"))
    manifest = json.loads(payload)  # parsed only after the signature verified
    if manifest["_type"] != "edgeloop/model-manifest" or manifest["spec_version"] != 1:
        raise Refused("not an edgeloop model manifest v1")
    if now > when(manifest["expires_at"]) + SKEW:
        raise Refused("manifest expired")
    if manifest["release"] < req["release_floor"]:
        raise Refused(f"release {manifest['release']} below floor {req['release_floor']}")
    # Step 5: targeting (empty list = any device).
    tg, dev = manifest.get("targeting", {}), req["device"]
    if tg.get("device_ids") and dev["device_id"] not in tg["device_ids"]:
        raise Refused("targeted at other devices")
    if tg.get("groups") and not set(tg["groups"]) & set(dev["groups"]):
        raise Refused("targeted at other groups")
    if tg.get("hardware_classes") and dev["hardware_class"] not in tg["hardware_classes"]:
        raise Refused("targeted at other hardware")
    # Step 6: the artifact's exact size and sha256.
    with open(req["artifact"], "rb") as fh:
        data = fh.read(manifest["artifact"]["size"] + 1)  # never read past signed size + 1
    if len(data) != manifest["artifact"]["size"]:
        raise Refused("artifact size differs from the signed size")
    if hashlib.sha256(data).hexdigest() != manifest["artifact"]["sha256"]:
        raise Refused("artifact sha256 differs from the signed hash")
    return manifest["release"]


def main() -> int:
    with open(sys.argv[1], "rb") as fh:
        req = json.load(fh)
    try:
        release, ok, reason = verify(req), True, "ok"
    except (Refused, KeyError, ValueError, TypeError) as exc:
        release, ok, reason = None, False, f"{type(exc).__name__}: {exc}"
    names = ("contract", "device_agent", "server", "training", "firmware_sim", "edgeloop")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in names)
    print(json.dumps({"ok": ok, "reason": reason, "release": release, "modules": loaded}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
