"""Shared fixtures: a real Mosquitto per test that needs one, real PostgreSQL, signing keys.

Mosquitto is started on a free port so a test can stop and restart it to inject broker faults.
PostgreSQL comes from ``EDGELOOP_TEST_PG_URL`` (default: the local server's ``test`` database);
each test gets its own schema-free database created from it and dropped afterwards.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import make_url

from firmware_sim.pki import Pki
from firmware_sim.services import (  # noqa: F401 (free_port, wait_port re-exported)
    Mosquitto,
    ServerProcess,
    free_port,
    wait_port,
)
from server.db import migrate

# The bootstrap admin operator token every test server uses (Settings.admin_token /
# EDGELOOP_ADMIN_TOKEN); send it with auth_headers(TEST_ADMIN_TOKEN).
TEST_ADMIN_TOKEN = "test-admin-token-0123456789"


def auth_headers(token: str) -> dict[str, str]:
    """HTTP headers that authenticate as the holder of ``token`` (operator or device)."""
    return {"Authorization": f"Bearer {token}"}


PG_URL = os.environ.get("EDGELOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def broker(tmp_path_factory) -> Iterator[Mosquitto]:
    """A real mosquitto on a free port; ``.stop()``/``.start()`` simulate a broker outage."""
    try:
        b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    yield b
    b.stop()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway CA (``firmware_sim.pki``) that signs broker and client certificates."""
    return Pki.create(tmp_path / "pki", "fleet")


@pytest.fixture
def tls_broker(tmp_path_factory, pki: Pki) -> Iterator[Mosquitto]:
    """A real mosquitto whose one listener is TLS only (a server certificate of ``pki`` for
    127.0.0.1 and localhost) and requires a client certificate signed by ``pki``."""
    try:
        b = Mosquitto(
            tmp_path_factory.mktemp("mosquitto-tls"), tls=pki.broker_tls(require_certificate=True)
        ).start()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    yield b
    b.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"edgeloop_t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
    base, _, _ = PG_URL.rpartition("/")
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """Run a storage test against SQLite and against the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/edgeloop.db"
    return request.getfixturevalue("pg_url")


_SQLITE_TEMPLATE: list[Path] = []  # one SQLite file per test session, made by migrate.upgrade


def upgraded(url: str) -> str:
    """Bring the database at ``url`` to the current schema through the operator's path
    (``server.db.migrate.upgrade``, what ``edgeloop db upgrade`` runs); returns ``url``.

    A SQLite file that does not exist yet is a copy of one upgraded once per test session (the
    same bytes the upgrade writes, without paying for it per test); in-memory URLs are left
    alone (each connection would see its own empty database).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        migrate.upgrade(url)
        return url
    if parsed.database in (None, "", ":memory:"):
        return url
    target = Path(parsed.database)
    if target.exists():
        migrate.upgrade(url)
        return url
    if not _SQLITE_TEMPLATE:
        folder = Path(tempfile.mkdtemp(prefix="edgeloop-schema-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = folder / "template.db"
        migrate.upgrade(f"sqlite:///{template}")
        # WAL mode: the last connection's close checkpoints; a copy of the file alone is whole.
        assert not template.with_name("template.db-wal").exists()
        _SQLITE_TEMPLATE.append(template)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_SQLITE_TEMPLATE[0], target)
    return url


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_key_pair(directory: Path, key: Ed25519PrivateKey) -> tuple[Path, Path]:
    """Write PEM private/public keys; returns (private_path, public_path)."""
    directory.mkdir(parents=True, exist_ok=True)
    priv = directory / "signing.pem"
    pub = directory / "signing.pub.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory kept by pytest after a failure (logs of servers and agents land here)."""
    return tmp_path


REPO = Path(__file__).resolve().parents[1]


def run_python(
    script: str, *args: str, unset: Iterable[str] = (), timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter from the repository root, without the environment
    variables named in ``unset``; a non-zero exit fails the test (CalledProcessError)."""
    drop = set(unset)
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k not in drop},
    )


def poll(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.3) -> Any:
    """Return ``check()``'s first truthy value; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# Settings for a real server process in tests: the factory model is trained at start, and
# rollouts move quickly on a small fleet.
FAST_SERVER_ENV = {
    "EDGELOOP_BOOTSTRAP_LINE": "digits",
    "EDGELOOP_BOOTSTRAP_TRAINER": "sklearn-mlp",
    "EDGELOOP_ROLLOUT_TICK_S": "0.5",
    "EDGELOOP_MIN_LABELLED": "20",
    "EDGELOOP_CANARY_MIN_SOAK_S": "1",
    "EDGELOOP_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
}


@pytest.fixture
def server(broker: Mosquitto, workdir: Path) -> Iterator[ServerProcess]:
    """The real edgeloop server in a subprocess, on the test's broker (``FAST_SERVER_ENV``)."""
    srv = ServerProcess(workdir / "server", mqtt_port=broker.port, env=FAST_SERVER_ENV).start()
    yield srv
    srv.stop()
