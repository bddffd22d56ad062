"""Ed25519 signature verification without importing ``cryptography`` (verification only).

The agent only ever verifies signatures, and ``cryptography`` costs a device ~8 MB of resident
memory (its Rust extension plus heap). The interpreter already maps OpenSSL's libcrypto (the
standard ``ssl`` module links it, and http.client and paho-mqtt import ``ssl`` anyway), so the
default backend calls libcrypto's EVP API through ctypes. ``cryptography`` remains the fallback,
and the only way to sign: the server and the key tools import it where they sign.

Backends, picked on first use:

- ``openssl``: ctypes on the libcrypto this process has loaded (OpenSSL >= 1.1.1).
- ``cryptography``: ``Ed25519PublicKey`` from the ``cryptography`` package.

``EDGELOOP_ED25519_BACKEND=openssl|cryptography`` forces one (an unusable forced backend is an
error); otherwise ``openssl`` is used when it loads and passes a known-answer self-check
(RFC 8032 section 7.1 TEST 1), else ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from contract._errors import SignatureError

if TYPE_CHECKING:
    from typing import TypeAlias

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

KEY_BYTES = 32  # raw Ed25519 public key
SIGNATURE_BYTES = 64  # raw Ed25519 signature (R || S)
MAX_PEM_BYTES = 16 * 1024  # bytes; an Ed25519 public key PEM is 113
BACKEND_ENV = "EDGELOOP_ED25519_BACKEND"
BACKENDS = ("openssl", "cryptography")

# DER SubjectPublicKeyInfo for Ed25519 (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
# BIT STRING (0 unused bits) } followed by the 32 raw key bytes.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"
# Algorithm OIDs (DER-encoded, with tag and length) named in the error for other key types.
_OTHER_ALGORITHMS = (
    (bytes.fromhex("06092a864886f70d010101"), "RSA"),
    (bytes.fromhex("06072a8648ce3d0201"), "EC"),
    (bytes.fromhex("06072a8648ce380401"), "DSA"),
    (bytes.fromhex("06032b656e"), "X25519"),
    (bytes.fromhex("06032b656f"), "X448"),
    (bytes.fromhex("06032b6571"), "Ed448"),
)

# RFC 8032 section 7.1 TEST 1 (empty message): the backend self-check.
_KAT_KEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_KAT_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class VerifyKey:
    """An Ed25519 public key that can only verify. Equal and hashed on its 32 raw bytes.

    It also equals a ``cryptography`` Ed25519PublicKey holding the same bytes (those are
    unhashable, so the hash rule is not at stake), as ``load_public_key`` results used to.
    """

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
            size = len(self.raw) if isinstance(self.raw, bytes) else type(self.raw).__name__
            raise SignatureError(f"an Ed25519 public key is {KEY_BYTES} raw bytes, got {size}")

    def __repr__(self) -> str:
        return f"VerifyKey({self.raw.hex()})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VerifyKey):
            return self.raw == other.raw
        raw = _cryptography_raw(other)
        return NotImplemented if raw is None else self.raw == raw

    def __hash__(self) -> int:
        return hash(self.raw)

    @classmethod
    def from_raw(cls, raw: bytes | bytearray | memoryview) -> VerifyKey:
        """Raises SignatureError unless ``raw`` is exactly 32 bytes."""
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise SignatureError(f"an Ed25519 public key is bytes, got {type(raw).__name__}")
        return cls(bytes(raw))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> VerifyKey:
        """Parse a PEM SubjectPublicKeyInfo holding an Ed25519 key, strictly.

        Raises:
            SignatureError: not one PEM ``PUBLIC KEY`` block, or the key is not Ed25519.
        """
        if isinstance(pem, str):
            pem = pem.encode("utf-8")
        if len(pem) > MAX_PEM_BYTES:
            raise SignatureError(f"not a PEM public key: {len(pem)} bytes, limit {MAX_PEM_BYTES}")
        try:
            lines = [line.strip() for line in pem.decode("ascii").strip().splitlines()]
        except UnicodeDecodeError as exc:
            raise SignatureError("not a PEM public key: the text is not ASCII") from exc
        first = lines[0] if lines else ""
        if not (first.startswith("-----BEGIN ") and first.endswith("-----")):
            raise SignatureError(f"not a PEM public key: no {_PEM_BEGIN} line")
        if first != _PEM_BEGIN:
            raise SignatureError(
                f"not an Ed25519 public key: the PEM block is {first[11:-5]!r}, "
                "expected 'PUBLIC KEY' (SubjectPublicKeyInfo)"
            )
        if len(lines) < 3 or lines[-1] != _PEM_END:
            raise SignatureError(f"not a PEM public key: it must end with {_PEM_END}")
        body = "".join(lines[1:-1])
        if "-----" in body:
            raise SignatureError("not a PEM public key: expected exactly one PEM block")
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SignatureError("not a PEM public key: the body is not valid base64") from exc
        if len(der) == len(_SPKI_PREFIX) + KEY_BYTES and der.startswith(_SPKI_PREFIX):
            return cls(der[len(_SPKI_PREFIX) :])
        algorithm = next((name for oid, name in _OTHER_ALGORITHMS if oid in der[:32]), None)
        what = f"it holds an {algorithm} key" if algorithm else "unrecognised key encoding"
        raise SignatureError(f"not an Ed25519 public key ({what})")

    def to_pem(self) -> bytes:
        """PEM SubjectPublicKeyInfo, byte-equal to what ``cryptography`` writes."""
        body = base64.b64encode(_SPKI_PREFIX + self.raw).decode("ascii")
        return f"{_PEM_BEGIN}\n{body}\n{_PEM_END}\n".encode("ascii")

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is a valid Ed25519 signature of ``message`` by this key.

        Bad signatures (any length but 64, S >= L, wrong key or message) return False; only an
        unusable backend raises (RuntimeError).
        """
        signature, message = bytes(signature), bytes(message)
        if len(signature) != SIGNATURE_BYTES:
            return False
        return _backend().verify(self.raw, signature, message)


def as_verify_key(key: Any) -> VerifyKey:
    """Normalise a VerifyKey, a ``cryptography`` Ed25519PublicKey or 32 raw bytes.

    ``cryptography`` objects are recognised by duck typing, so this never imports it.

    Raises:
        SignatureError: raw bytes of the wrong length.
        TypeError: anything else.
    """
    if isinstance(key, VerifyKey):
        return key
    if isinstance(key, bytes | bytearray | memoryview):
        return VerifyKey.from_raw(key)
    raw = _cryptography_raw(key)
    if raw is not None:
        return VerifyKey.from_raw(raw)
    raise TypeError(
        f"expected an Ed25519 public key (VerifyKey, Ed25519PublicKey or 32 bytes), "
        f"got {type(key).__name__}"
    )


def _cryptography_raw(key: object) -> bytes | None:
    """The raw bytes of a ``cryptography`` Ed25519PublicKey (duck-typed), else None."""
    if not (hasattr(key, "public_bytes") and type(key).__name__ == "Ed25519PublicKey"):
        return None
    raw_bytes = getattr(key, "public_bytes_raw", None)
    if callable(raw_bytes):  # cryptography >= 40
        return bytes(raw_bytes())
    from cryptography.hazmat.primitives import serialization  # loaded already: ``key`` is one

    return bytes(
        key.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    )


# ---- backends --------------------------------------------------------------------------------
class _Backend(Protocol):
    name: str

    def verify(self, key: bytes, signature: bytes, message: bytes) -> bool: ...


_NID_ED25519 = 1087  # EVP_PKEY_ED25519
_VOID_P = ctypes.c_void_p
_BUF = ctypes.c_char_p  # const unsigned char *: bytes are passed without copying or truncation
_SIZE = ctypes.c_size_t


def _loaded_libcrypto() -> str | None:
    """Path of the libcrypto this process already has mapped (Linux), else None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                path = parts[5].strip()
                if os.path.basename(path).startswith("libcrypto.so") and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


class _OpenSSLBackend:
    """EVP_DigestVerify on the process's libcrypto, through ctypes (OpenSSL >= 1.1.1)."""

    name = "openssl"

    def __init__(self, path: str | None = None) -> None:
        """Bind to the libcrypto this process has loaded, or to the one at ``path`` (tests run
        the RFC 8032 vectors against every libcrypto found: tests/contract/test_ed25519_abi.py).
        """
        if path is None:
            import ssl  # noqa: F401  - maps libcrypto, so it is found below, not loaded twice

            path = _loaded_libcrypto()
        if path is None:
            from ctypes.util import find_library

            path = find_library("crypto")
        if path is None:
            raise OSError("libcrypto not found")
        lib = ctypes.CDLL(path)
        self.path = path
        # Missing symbols (OpenSSL < 1.1.1) raise AttributeError here.
        self._new_key = _fn(
            lib.EVP_PKEY_new_raw_public_key, _VOID_P, ctypes.c_int, _VOID_P, _BUF, _SIZE
        )
        self._free_key = _fn(lib.EVP_PKEY_free, None, _VOID_P)
        self._new_ctx = _fn(lib.EVP_MD_CTX_new, _VOID_P)
        self._free_ctx = _fn(lib.EVP_MD_CTX_free, None, _VOID_P)
        self._init = _fn(
            lib.EVP_DigestVerifyInit, ctypes.c_int, _VOID_P, _VOID_P, _VOID_P, _VOID_P, _VOID_P
        )
        self._verify = _fn(lib.EVP_DigestVerify, ctypes.c_int, _VOID_P, _BUF, _SIZE, _BUF, _SIZE)
        self._clear_errors = _fn(lib.ERR_clear_error, None)

    def verify(self, key: bytes, signature: bytes, message: bytes) -> bool:
        ok = False
        pkey = self._new_key(_NID_ED25519, None, key, len(key))
        if pkey:
            try:
                ctx = self._new_ctx()
                if not ctx:
                    raise MemoryError("EVP_MD_CTX_new failed")
                try:
                    if self._init(ctx, None, None, None, pkey) == 1:
                        ok = (
                            self._verify(ctx, signature, len(signature), message, len(message)) == 1
                        )
                finally:
                    self._free_ctx(ctx)
            finally:
                self._free_key(pkey)
        if not ok:
            # A failed verify may leave entries on this thread's OpenSSL error queue, where the
            # ssl module would later mistake them for errors of its own.
            self._clear_errors()
        return ok


def _fn(func: Any, restype: Any, *argtypes: Any) -> Any:
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


class _CryptographyBackend:
    """The ``cryptography`` package (imported only when this backend is chosen)."""

    name = "cryptography"

    def __init__(self) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._invalid = InvalidSignature
        self._key_type = Ed25519PublicKey

    def verify(self, key: bytes, signature: bytes, message: bytes) -> bool:
        try:
            self._key_type.from_public_bytes(key).verify(signature, message)
        except (self._invalid, ValueError):
            return False
        return True


_LOADERS: dict[str, Callable[[], _Backend]] = {
    "openssl": _OpenSSLBackend,
    "cryptography": _CryptographyBackend,
}
_chosen: _Backend | None = None
_lock = threading.Lock()


def _self_check(backend: _Backend) -> bool:
    """RFC 8032 TEST 1 verifies, and the same signature with one bit flipped does not."""
    flipped = bytes([_KAT_SIG[0] ^ 0x01]) + _KAT_SIG[1:]
    try:
        return backend.verify(_KAT_KEY, _KAT_SIG, b"") and not backend.verify(
            _KAT_KEY, flipped, b""
        )
    except Exception:  # a probe: whatever a broken library raises means "not usable"
        log.debug("Ed25519 backend %s failed its self-check", backend.name, exc_info=True)
        return False


def _load(name: str) -> _Backend:
    """Load one backend and self-check it. Raises RuntimeError when it is unusable."""
    try:
        backend: _Backend = _LOADERS[name]()
    except (OSError, AttributeError, ImportError) as exc:
        raise RuntimeError(f"Ed25519 backend {name!r} cannot be loaded: {exc}") from exc
    if not _self_check(backend):
        raise RuntimeError(f"Ed25519 backend {name!r} failed its RFC 8032 known-answer self-check")
    return backend


def _choose() -> _Backend:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise RuntimeError(f"{BACKEND_ENV}={forced!r}: must be one of {', '.join(BACKENDS)}")
        return _load(forced)
    try:
        return _load("openssl")
    except RuntimeError as exc:
        log.warning("%s; verifying Ed25519 signatures with cryptography instead", exc)
    return _load("cryptography")


def _backend() -> _Backend:
    global _chosen
    backend = _chosen
    if backend is None:
        with _lock:
            if _chosen is None:
                _chosen = _choose()
            backend = _chosen
    return backend


def backend_name() -> str:
    """The backend verifying signatures in this process (picks it if none is yet).

    Raises:
        RuntimeError: the forced backend (or, unforced, every backend) is unusable.
    """
    return _backend().name


def _reset_backend() -> None:
    """Forget the chosen backend, so the next verification picks again (tests only)."""
    global _chosen
    with _lock:
        _chosen = None


if TYPE_CHECKING:
    # What the verification APIs accept for a public key (normalised with ``as_verify_key``).
    PublicKeyLike: TypeAlias = VerifyKey | Ed25519PublicKey | bytes

__all__ = [
    "BACKEND_ENV",
    "BACKENDS",
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "VerifyKey",
    "as_verify_key",
    "backend_name",
]
