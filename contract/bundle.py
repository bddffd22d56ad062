"""Offline bundle: one exported release on disk, for third parties and air-gapped sites.

``edgeloop releases export LINE N DIR`` writes it from the server's API and
``edgeloop-agent install DIR`` installs it with no server and no broker (as Mender's standalone
mode does). Layout (docs/bundle-format.md, section 8)::

    DIR/bundle.json              the index (``BundleIndex``): names the files below
    DIR/envelope.json            the release's manifest envelope (DSSE JSON, as signed)
    DIR/<artifact.name>          the ONNX bytes (the name the signed manifest gives them)
    DIR/roots/<v>.root.json      root metadata envelopes, version 1 to the newest

The index is NOT signed and is not trusted: it only says where the files are. Trust comes from
the device's pinned root, the root chain, the manifest signature and the artifact's signed
sha256, checked exactly as for an online update. So the index is parsed strictly (bounded size,
exact types, file names that cannot leave DIR), and everything it claims besides file names is
informational. This module is pure: bytes in, a ``BundleIndex`` out, or ``BundleFormatError``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from contract._errors import ContractError

BUNDLE_TYPE = "edgeloop/offline-bundle"
BUNDLE_VERSION = 1
INDEX_FILE = "bundle.json"
ENVELOPE_FILE = "envelope.json"
ROOTS_DIR = "roots"
MAX_INDEX_BYTES = 64 * 1024  # bytes of bundle.json (a few hundred in practice)
MAX_BUNDLE_ROOTS = 256  # root envelopes one bundle may carry (= contract.messages' target limit)
# A file the index names: a plain name in DIR, or one in DIR/roots. No "..", no absolute path.
_FILE = re.compile(r"(roots/)?[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class BundleFormatError(ContractError):
    """The bundle index is missing, too large, not JSON, or names a file it may not."""


def root_file(version: int) -> str:
    """Where root version ``version`` lives inside a bundle directory."""
    return f"{ROOTS_DIR}/{version}.root.json"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise BundleFormatError(message)


def _file_name(value: Any, what: str) -> str:
    _require(
        isinstance(value, str) and _FILE.fullmatch(value) is not None and ".." not in value,
        f"bundle index: {what} must be a file name inside the bundle directory",
    )
    return str(value)


def _positive(value: Any, what: str) -> int:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"bundle index: {what} must be an integer >= 1",
    )
    return int(value)


@dataclass(frozen=True)
class BundleIndex:
    """``bundle.json``. ``model_line``/``release``/``model_version`` only describe the bundle:
    the installer acts on the signed manifest's values."""

    model_line: str
    release: int
    model_version: int
    envelope: str  # file name of the manifest envelope
    artifact: str  # file name of the ONNX bytes
    roots: tuple[str, ...]  # file names of root v1..vN, in version order
    exported_at: str = ""  # RFC 3339 UTC, informational
    exported_from: str = ""  # the server's URL, informational

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": BUNDLE_TYPE,
            "bundle_version": BUNDLE_VERSION,
            "model_line": self.model_line,
            "release": self.release,
            "model_version": self.model_version,
            "envelope": self.envelope,
            "artifact": self.artifact,
            "roots": list(self.roots),
            "exported_at": self.exported_at,
            "exported_from": self.exported_from,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> BundleIndex:
        """Parse ``bundle.json``. Raises BundleFormatError."""
        _require(len(raw) <= MAX_INDEX_BYTES, f"bundle index is over {MAX_INDEX_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleFormatError(f"bundle index is not JSON: {exc}") from exc
        _require(isinstance(data, dict), "bundle index must be a JSON object")
        _require(data.get("_type") == BUNDLE_TYPE, f"bundle index _type must be {BUNDLE_TYPE!r}")
        version = data.get("bundle_version")
        _require(
            isinstance(version, int) and not isinstance(version, bool) and version == 1,
            f"unsupported bundle_version {version!r} (this agent reads {BUNDLE_VERSION})",
        )
        line = data.get("model_line")
        _require(isinstance(line, str) and bool(line), "bundle index: model_line must be a string")
        roots = data.get("roots")
        _require(
            isinstance(roots, list) and 1 <= len(roots) <= MAX_BUNDLE_ROOTS,
            f"bundle index: roots must list 1..{MAX_BUNDLE_ROOTS} files",
        )
        names = tuple(_file_name(r, "each root") for r in roots)
        _require(len(set(names)) == len(names), "bundle index: roots are listed twice")
        texts = [data.get(k, "") for k in ("exported_at", "exported_from")]
        _require(
            all(isinstance(t, str) and len(t) <= 1024 for t in texts),
            "bundle index: exported_at/exported_from must be short strings",
        )
        return cls(
            model_line=line,
            release=_positive(data.get("release"), "release"),
            model_version=_positive(data.get("model_version"), "model_version"),
            envelope=_file_name(data.get("envelope"), "envelope"),
            artifact=_file_name(data.get("artifact"), "artifact"),
            roots=names,
            exported_at=texts[0],
            exported_from=texts[1],
        )


__all__ = [
    "BUNDLE_TYPE",
    "BUNDLE_VERSION",
    "ENVELOPE_FILE",
    "INDEX_FILE",
    "MAX_BUNDLE_ROOTS",
    "MAX_INDEX_BYTES",
    "ROOTS_DIR",
    "BundleFormatError",
    "BundleIndex",
    "root_file",
]
