"""Run a server from a server-only install (no torch, no scikit-learn) with a real Mosquitto;
a worker from this checkout trains; exit 0 if the server registered, signed and serves the model.

Usage: python scripts/server_smoke.py /path/to/server-venv
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from firmware_sim.services import Mosquitto, WorkerProcess, free_port

ADMIN_TOKEN = "server-smoke-admin-token-0123456789"
TIMEOUT_S = 300.0  # seconds for the whole loop: start, train, register


def main(venv: Path) -> int:
    root = Path(tempfile.mkdtemp(prefix="edgeloop-server-smoke-"))
    db = f"sqlite:///{root}/edgeloop.db"
    artifacts = root / "artifacts"
    bin_ = venv / "bin"

    def run(*args: str) -> None:  # the server-only install's own CLI, outside the checkout
        subprocess.run([str(bin_ / "edgeloop"), *args], cwd=root, check=True, capture_output=True)

    run("db", "upgrade", "--database-url", db)
    run("keys", "init", str(root / "keys"))
    run("keys", "init-root", "--out", str(root / "trust"),
        "--release-key-pub", str(root / "keys" / "signing.pub.pem"))  # fmt: skip
    broker = Mosquitto(root / "mosquitto").start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "EDGELOOP_ENVIRONMENT": "production",
        "EDGELOOP_ADMIN_TOKEN": ADMIN_TOKEN,
        "EDGELOOP_DATA_DIR": str(root / "server"),
        "EDGELOOP_DATABASE_URL": db,
        "EDGELOOP_ARTIFACT_STORE_URL": artifacts.as_uri(),
        "EDGELOOP_SIGNING_KEY_PATH": str(root / "keys" / "signing.pem"),
        "EDGELOOP_TRUST_DIR": str(root / "trust"),
        "EDGELOOP_PORT": str(port),
        "EDGELOOP_MQTT_PORT": str(broker.port),
        "EDGELOOP_MQTT_ALLOW_PLAINTEXT": "true",  # a loopback broker
        "EDGELOOP_BOOTSTRAP_LINE": "digits",
        "EDGELOOP_REGISTRAR_POLL_S": "0.5",
    }
    log = open(root / "server.log", "wb")  # noqa: SIM115 - handed to the child
    server = subprocess.Popen(
        [str(bin_ / "edgeloop-server")], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT
    )
    worker = WorkerProcess(root / "worker", database_url=db, artifact_store_url=artifacts.as_uri())
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    started = time.monotonic()
    try:
        deadline = started + TIMEOUT_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                print(f"FAIL: server exited with {server.returncode}", file=sys.stderr)
                print((root / "server.log").read_text()[-4000:], file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        jobs = httpx.get(f"{url}/api/v1/training-jobs", headers=headers, timeout=10).json()
        print(f"server-only install serves the API: job {jobs[0]['id']} {jobs[0]['status']}")
        worker.start()
        line: dict = {}
        while time.monotonic() < deadline:
            line = httpx.get(f"{url}/api/v1/model-lines/digits", headers=headers, timeout=10).json()
            if line.get("current_release"):
                break
            time.sleep(0.5)
        else:
            print(f"FAIL: no release: {line}\n{worker.log_tail()}", file=sys.stderr)
            return 1
        v = httpx.get(
            f"{url}/api/v1/model-lines/digits/versions/{line['champion_version']}",
            headers=headers,
            timeout=10,
        ).json()
        blob = httpx.get(f"{url}/api/v1/artifacts/{v['sha256']}", timeout=30).content
        if hashlib.sha256(blob).hexdigest() != v["sha256"]:
            print("FAIL: the served artifact does not hash to its version's sha", file=sys.stderr)
            return 1
        print(
            f"server-only install registered and signed v{v['version']} (release "
            f"{line['current_release']}) trained by a worker, serves its {len(blob)} bytes; "
            f"{time.monotonic() - started:.1f} s"
        )
        return 0
    finally:
        worker.stop()
        server.terminate()
        server.wait(30)
        log.close()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
