"""Run an agent from an agent-only install against a real server and broker; exit 0 if it serves.

Usage: python scripts/agent_smoke.py /path/to/agent-venv/bin/edgeloop-agent
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from firmware_sim.services import Mosquitto, ServerProcess


def main(agent_exe: str) -> int:
    root = Path(tempfile.mkdtemp(prefix="edgeloop-agent-smoke-"))
    broker = Mosquitto(root / "mosquitto").start()
    server = ServerProcess(
        root / "server", mqtt_port=broker.port, env={"EDGELOOP_BOOTSTRAP_LINE": "digits"}
    ).start()
    agent = None
    try:
        deadline = time.monotonic() + 180
        while not server.root_path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        cfg = root / "agent.json"
        cfg.write_text(
            json.dumps(
                {
                    "device_id": "smoke-0001",
                    "model_line": "digits",
                    "server_url": server.url,
                    "mqtt_host": "127.0.0.1",
                    "mqtt_port": broker.port,
                    "state_dir": str(root / "agent"),
                    "trusted_root_file": str(server.root_path),
                    "bootstrap_token": server.enrollment_token(max_uses=1),
                }
            )
        )
        agent = subprocess.Popen(
            [agent_exe, "run", "--config", str(cfg), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = agent.stdout.readline() if agent.stdout else ""
        if "listening on" not in line:
            print(f"FAIL: agent did not start: {line!r}", file=sys.stderr)
            return 1
        url = line.strip().rsplit(" ", 1)[-1]
        while time.monotonic() < deadline:
            status = httpx.get(f"{url}/status").json()
            if status.get("model_version"):
                break
            time.sleep(0.3)
        else:
            print(
                f"FAIL: no model installed: {status}\n{(root / 'agent.log').read_text()}",
                file=sys.stderr,
            )
            return 1
        r = httpx.post(f"{url}/predict", json={"input": [0.0] * 64})
        r.raise_for_status()
        print(
            f"agent-only install serves v{status['model_version']} "
            f"(release {status['release']}): prediction {r.json()['label']} "
            f"in {r.json()['latency_ms']:.2f} ms"
        )
        return 0
    finally:
        if agent:
            agent.terminate()
            agent.wait(20)
        server.stop()
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
