"""contract.ed25519 against every OpenSSL it may meet.

The ``openssl`` backend calls libcrypto's EVP functions through ctypes with argument types
written by hand. An ABI change (a new OpenSSL major, a function whose signature moved) would not
fail to import: it would verify wrongly or crash. So the RFC 8032 vectors, each also with one
bit of the signature flipped and with the message changed, plus random and large messages, run in
a fresh process:

- under every supported Python found on this machine (>= 3.11: this interpreter, the system's,
  pyenv's, and any listed in ``$EDGELOOP_ABI_PYTHONS``, separated by ``os.pathsep``), against
  the libcrypto its ``ssl`` module links, which is what a device running that Python uses;
- against every other libcrypto shared library found (the system's library directories and
  wheels that bundle one, e.g. psycopg-binary), loaded by path.

The ids name each interpreter and OpenSSL version, so ``pytest -v`` lists what was covered.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.contract.test_ed25519 import RFC8032

REPO = Path(__file__).resolve().parents[2]

# Runs in the child. contract/__init__ imports numpy (contract.monitoring) and interpreters other
# than the project's have none; ed25519 needs only the standard library, so the package is
# stubbed and the two modules load alone.
CHILD = r"""
import ctypes, json, sys, types
repo, path = sys.argv[1], sys.argv[2] or None
pkg = types.ModuleType("contract")
pkg.__path__ = [repo + "/contract"]
sys.modules["contract"] = pkg
from contract import ed25519
backend = ed25519._OpenSSLBackend(path)
results = []
for key, msg, sig in json.loads(sys.stdin.read()):
    key, msg, sig = bytes.fromhex(key), bytes.fromhex(msg), bytes.fromhex(sig)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    results.append([backend.verify(key, sig, msg), backend.verify(key, flipped, msg),
                    backend.verify(key, sig, msg + b"!")])
lib = ctypes.CDLL(backend.path)
lib.OpenSSL_version.restype = ctypes.c_char_p
lib.OpenSSL_version.argtypes = [ctypes.c_int]
print(json.dumps({"path": backend.path, "openssl": lib.OpenSSL_version(0).decode(),
                  "python": sys.version.split()[0], "results": results}))
"""

PROBE_PYTHON = "import sys, ssl; print(sys.version_info >= (3, 11), ssl.OPENSSL_VERSION)"
PROBE_LIB = (
    "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
    "lib.OpenSSL_version.restype = ctypes.c_char_p; lib.OpenSSL_version.argtypes = [ctypes.c_int]; "
    "print(lib.OpenSSL_version(0).decode())"
)


def _probe(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def supported_pythons() -> list[tuple[str, str]]:
    """(interpreter, its id) for each distinct Python >= 3.11 found."""
    candidates = [sys.executable]
    candidates += sorted(
        glob.glob("/usr/bin/python3.1[1-9]") + glob.glob("/usr/local/bin/python3.1[1-9]")
    )
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv}/versions/3.1[1-9]*/bin/python3"))
    candidates += [p for p in os.environ.get("EDGELOOP_ABI_PYTHONS", "").split(os.pathsep) if p]
    found: dict[str, tuple[str, str]] = {}
    for exe in candidates:
        real = os.path.realpath(exe)
        if real in found or not os.access(real, os.X_OK):
            continue
        out = _probe([real, "-I", "-S", "-c", PROBE_PYTHON])
        if out and out.startswith("True "):
            version = _probe([real, "-I", "-S", "-c", "import sys; print(sys.version.split()[0])"])
            found[real] = (real, f"python{version}-{out.split(' ', 1)[1].split(' ')[1]}")
    return list(found.values())


def libcryptos() -> list[tuple[str, str]]:
    """(path, its id) for each distinct libcrypto shared library found."""
    patterns = [
        "/lib/*/libcrypto.so.*",
        "/usr/lib/libcrypto.so.*",
        "/usr/lib/*/libcrypto.so.*",
        "/usr/local/lib/libcrypto.so.*",
        "/usr/local/lib/*/libcrypto.so.*",
    ]
    patterns += [f"{p}/*.libs/libcrypto*.so*" for p in sys.path if p.endswith("site-packages")]
    found: dict[str, tuple[str, str]] = {}
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            real = os.path.realpath(path)
            if real in found:
                continue
            version = _probe([sys.executable, "-I", "-S", "-c", PROBE_LIB, real])
            if version:
                found[real] = (real, f"{Path(real).name}-{version.split(' ')[1]}")
    return list(found.values())


def vectors() -> list[list[str]]:
    """RFC 8032 section 7.1, then random keys and messages (empty to 1 MiB) signed here."""
    out = [[pub, msg, sig] for _, _, pub, msg, sig in RFC8032]
    rng = random.Random(8032)
    for size in (0, 1, 31, 32, 33, 64, 1000, 1 << 16, 1 << 20):
        key = Ed25519PrivateKey.generate()
        msg = rng.randbytes(size)
        pub = key.public_key().public_bytes_raw()
        out.append([pub.hex(), msg.hex(), key.sign(msg).hex()])
    return out


def run_vectors(python: str, libcrypto: str = "") -> dict:
    out = subprocess.run(
        [python, "-I", "-S", "-c", CHILD, str(REPO), libcrypto],
        input=json.dumps(vectors()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]  # a crash in libcrypto ends up here
    return json.loads(out.stdout)


PYTHONS = supported_pythons()
LIBS = libcryptos()


@pytest.mark.parametrize("python", [p for p, _ in PYTHONS], ids=[i for _, i in PYTHONS])
def test_vectors_under_each_supported_python_and_the_openssl_it_links(python: str) -> None:
    got = run_vectors(python)
    assert got["results"] == [[True, False, False]] * len(vectors()), got


@pytest.mark.parametrize("libcrypto", [p for p, _ in LIBS], ids=[i for _, i in LIBS])
def test_vectors_against_each_libcrypto_found(libcrypto: str) -> None:
    got = run_vectors(sys.executable, libcrypto)
    assert got["path"] == libcrypto
    assert got["results"] == [[True, False, False]] * len(vectors()), got


def test_something_was_found() -> None:
    assert PYTHONS and LIBS, (PYTHONS, LIBS)
