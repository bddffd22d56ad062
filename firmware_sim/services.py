"""Start the real services the demo, the tests and the benchmarks run against.

``Mosquitto`` runs the broker binary on a free port in its own directory (so a test can stop and
restart it); ``ServerProcess`` runs the edgeloop server in a subprocess configured by environment
variables, exactly as an operator would: first ``edgeloop db upgrade``'s function on its database,
then ``edgeloop-server``.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.core.config import DEV_ADMIN_TOKEN
from server.db import migrate
from server.identity.broker_acl import wait_catches_sighup

BIND_ATTEMPTS = 3  # server starts, each on a newly picked port when its port was taken


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def raise_nofile(want: int) -> int:
    """Raise this process's open-file limit (RLIMIT_NOFILE) towards ``want``; returns the new
    soft limit. The hard limit is raised too where the process may (root); otherwise the soft
    limit stops at the hard one. One socket per simulated device needs this above ~1,000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def _nofile_preexec(want: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child its own open-file limit (None: inherit ours)."""
    if want is None:
        return None

    def preexec() -> None:
        raise_nofile(want)

    return preexec


def mosquitto_binary() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise FileNotFoundError("mosquitto is not installed: run scripts/setup.sh")
    return exe


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener for :class:`Mosquitto`: the PEM files it serves and trusts."""

    ca_file: Path  # CAs that sign the client certificates it accepts (``cafile``)
    cert_file: Path  # the broker's own certificate
    key_file: Path  # its key
    require_certificate: bool = False  # clients must present a certificate signed by ca_file

    def conf(self) -> str:
        """The listener options of mosquitto.conf (after the ``listener`` line)."""
        return (
            f"cafile {self.ca_file}\ncertfile {self.cert_file}\nkeyfile {self.key_file}\n"
            f"require_certificate {'true' if self.require_certificate else 'false'}\n"
        )


class Mosquitto:
    """A mosquitto broker process on a free loopback port; ``stop()``/``start()`` for outages.

    ``tls`` makes the one listener a TLS listener (MQTT over TLS) with those files.

    ``max_connections`` (None: mosquitto's default, unlimited) and ``nofile`` (the broker's own
    open-file limit, set in the child before exec; None: inherit) let one broker hold a
    10,000-device swarm: each client is one file descriptor.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        auth_dir: Path | None = None,
        max_connections: int | None = None,
        nofile: int | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.tls = tls
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        # auth_dir: where server.identity.broker_acl writes passwd + acl; then anonymous clients are
        # refused and every client is held to its ACL. pid_file lets the server SIGHUP us.
        self.auth_dir = Path(auth_dir).resolve() if auth_dir is not None else None
        self.pid_file = self.workdir / "mosquitto.pid"
        self.max_connections = max_connections
        self.nofile = nofile

    def start(self) -> Mosquitto:
        conf = self.workdir / "mosquitto.conf"
        # Stay the user that owns the 0600 files (as root, mosquitto would drop to the
        # "mosquitto" user, who cannot read them).
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        if self.auth_dir is not None:
            auth = (
                user + "allow_anonymous false\n"
                "per_listener_settings false\n"
                f"password_file {self.auth_dir / 'passwd'}\n"
                f"acl_file {self.auth_dir / 'acl'}\n"
            )
        else:
            auth = (user if self.tls is not None else "") + "allow_anonymous true\n"
        listener = f"listener {self.port} 127.0.0.1\n"
        if self.tls is not None:
            listener += self.tls.conf()
        conf.write_text(
            listener + auth + "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "max_queued_messages 100000\n"
            # Connects, disconnects (with their reasons) and errors, for reading a failed run.
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            + (
                f"max_connections {self.max_connections}\n"
                if self.max_connections is not None
                else ""
            )
        )
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_nofile_preexec(self.nofile),  # noqa: PLW1509 - only sets a limit
        )
        # The pid file (the server SIGHUPs it on every enroll/revoke) is written only once the
        # broker listens and handles SIGHUP: mosquitto installs its handler after opening its
        # listeners, and a SIGHUP before that kills it (its default action).
        wait_port(self.port)
        wait_catches_sighup(self.proc.pid)
        self.pid_file.write_text(f"{self.proc.pid}\n")
        return self

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password and ACL files."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.pid_file.unlink(missing_ok=True)  # nothing to signal while it is down
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class _ChildProcess:
    """A child process writing to ``log_path``: the log's tail, and a stop that waits for it
    (SIGTERM, or SIGKILL with ``kill``; SIGKILL anyway after ``stop_wait_s``)."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path
    stop_wait_s = 20.0

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, *, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class ServerProcess(_ChildProcess):
    """The edgeloop server (uvicorn) in a subprocess, configured through EDGELOOP_* variables."""

    def __init__(
        self,
        data_dir: Path,
        *,
        mqtt_port: int,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        python: str = sys.executable,
        nofile: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.nofile = nofile  # the server's own open-file limit (None: inherit)
        # A port picked here may be taken by another process before the server binds it (any
        # outgoing connection on the machine may get it as its local port): then start() picks
        # another. A port the caller chose is kept.
        self._picked_port = port is None and not {"EDGELOOP_PORT", "EDGELOOP_PUBLIC_URL"} & set(
            env or {}
        )
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = python
        self.env = {
            "EDGELOOP_ENVIRONMENT": "development",
            "EDGELOOP_DATA_DIR": str(self.data_dir),
            "EDGELOOP_DATABASE_URL": f"sqlite:///{self.data_dir}/edgeloop.db",
            "EDGELOOP_HOST": "127.0.0.1",
            "EDGELOOP_PORT": str(self.port),
            "EDGELOOP_PUBLIC_URL": self.url,
            "EDGELOOP_MQTT_HOST": "127.0.0.1",
            "EDGELOOP_MQTT_PORT": str(mqtt_port),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "server.log"
        # The bootstrap admin operator token (development default unless the env sets one).
        self.admin_token = self.env.get("EDGELOOP_ADMIN_TOKEN") or DEV_ADMIN_TOKEN

    @property
    def headers(self) -> dict[str, str]:
        """Authorization headers of the admin operator."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def enroll(self, device_id: str, model_line: str, *, token: str | None = None) -> str:
        """Enroll one device (benchmarks, tests); returns its credential."""
        resp = httpx.post(
            f"{self.url}/api/v1/devices/enroll",
            json={
                "bootstrap_token": token or self.enrollment_token(max_uses=1),
                "device_id": device_id,
                "model_line": model_line,
            },
            timeout=30,
        )
        resp.raise_for_status()
        return str(resp.json()["credential"])

    def enrollment_token(self, max_uses: int = 1000) -> str:
        """A multi-use bootstrap token for a fleet (made with the admin token)."""
        resp = httpx.post(
            f"{self.url}/api/v1/enrollment-tokens",
            json={"max_uses": max_uses},
            headers=self.headers,
            timeout=30,
        )
        resp.raise_for_status()
        return str(resp.json()["token"])

    @property
    def public_key_path(self) -> Path:
        return self.data_dir / "keys" / "signing.pub.pem"

    @property
    def root_path(self) -> Path:
        """Root metadata v1 (development: generated at first start): what devices pin."""
        return self.data_dir / "trust" / "1.root.json"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        for attempt in range(BIND_ATTEMPTS):
            self.data_dir.mkdir(parents=True, exist_ok=True)
            log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start_once(timeout)
            except RuntimeError:
                with open(self.log_path, "rb") as log:
                    log.seek(log_from)
                    taken = b"address already in use" in log.read()
                if not (taken and self._picked_port) or attempt == BIND_ATTEMPTS - 1:
                    raise
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.env["EDGELOOP_PORT"] = str(self.port)
            self.env["EDGELOOP_PUBLIC_URL"] = self.url
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> ServerProcess:
        env = {**os.environ, **self.env}
        # The server refuses a database that is not at the current schema; an operator runs
        # `edgeloop db upgrade` first, and so does this (its function, without a second
        # interpreter's start-up per server).
        migrate.upgrade(env["EDGELOOP_DATABASE_URL"])
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [self.python, "-c", "from server.main import run; run()"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_nofile_preexec(self.nofile),  # noqa: PLW1509 - only sets a limit
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log_tail()}")


class WorkerProcess(_ChildProcess):
    """A training worker (``edgeloop worker``) in a subprocess, configured through EDGELOOP_*
    variables: it needs only the database and the artifact store the servers use. ``stop``
    SIGTERMs it (the running job goes back to the queue) or, with ``kill``, SIGKILLs it."""

    stop_wait_s = 40.0

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str,
        artifact_store_url: str,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.python = python
        self.env = {
            "EDGELOOP_ENVIRONMENT": "production",
            "EDGELOOP_DATA_DIR": str(self.data_dir),
            "EDGELOOP_DATABASE_URL": database_url,
            "EDGELOOP_ARTIFACT_STORE_URL": artifact_store_url,
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "worker.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def holds(self, claimed_by: str | None) -> bool:
        """Whether a job's ``claimed_by`` names this process (``host:pid:nonce``)."""
        return self.proc is not None and f":{self.proc.pid}:" in f"{claimed_by or ''}"

    def start(self) -> WorkerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [self.python, "-m", "server.cli.main", "worker"],
            env={**os.environ, **self.env},
            cwd=Path(__file__).resolve().parents[1],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self
