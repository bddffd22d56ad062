"""Full fidelity: every device is its own ``edgeloop-agent run`` process.

    .venv/bin/python -m firmware_sim.procfleet --devices 50 [--results PATH]

The swarm (``firmware_sim.swarm``) reaches 10,000 devices by simulating each device's protocol
in one asyncio process; this mode trades scale for fidelity. It starts a Mosquitto with the
server-generated password file and ACL, the real server, and N real agent processes, each with
its own config, state directory, enrolled credential, MQTT session, spool, probation and local
HTTP API. It drives labelled traffic through each agent's ``POST /predict`` and ``/feedback``
(drifted inputs, so the agents capture and upload their mistakes), has an operator trigger a
training, approves the candidate's rollout and watches every process install, go through
probation and commit. A progress line while it runs; a results JSON at the end; exit status 0
only when every agent committed the new version.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from firmware_sim.demo import LoopDidNotClose, wait_for
from firmware_sim.fleet import SENSOR_NOISE, Inputs
from firmware_sim.services import Mosquitto, ServerProcess
from server.db.job_queue import ACTIVE_JOB_STATES  # queued, running, trained: not done yet

LINE = "digits"
START_TIMEOUT_S = 120.0  # seconds for all agent processes to print their listening line


FleetFailed = LoopDidNotClose  # the run did not reach its goal; the message says where


@dataclass
class AgentProcess:
    """One real agent process and the local API it listens on."""

    device_id: str
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[str] | None = None
    url: str = ""

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "device_agent.cli",
                "run",
                "--config",
                str(self.config_path),
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "w"),  # noqa: SIM115 - handed to the child
            text=True,
        )

    def read_url(self) -> None:
        """Block until the agent prints ``edgeloop-agent listening on URL``."""
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise FleetFailed(f"{self.device_id} did not start: {line!r}, see {self.log_path}")
        self.url = line.strip().rsplit(" ", 1)[-1]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def rss_bytes(self) -> int:
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss) if self.proc else 0
        except psutil.Error:
            return 0


@dataclass
class Traffic:
    """Labelled traffic through every agent's local API, ``rate_hz`` inferences per agent."""

    agents: list[AgentProcess]
    inputs: Inputs
    rate_hz: float
    drifted: bool = True
    sent: int = 0
    failed: int = 0
    by_version: Counter[int] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="procfleet-traffic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        lock = threading.Lock()
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "http"):
                local.http = httpx.Client(timeout=10.0)
            return local.http

        def one(agent: AgentProcess, i: int, noise: np.ndarray) -> None:
            pool = self.inputs.drifted if self.drifted else self.inputs.clean
            x = np.clip(pool[i] + noise, 0.0, 1.0).astype(np.float32)
            try:
                r = client().post(f"{agent.url}/predict", json={"input": x.tolist()})
                r.raise_for_status()
                pred = r.json()
                client().post(
                    f"{agent.url}/feedback",
                    json={
                        "prediction_id": pred["prediction_id"],
                        "true_label": int(self.inputs.labels[i]),
                    },
                ).raise_for_status()
            except (httpx.HTTPError, ValueError, KeyError):
                with lock:
                    self.failed += 1
                return
            with lock:
                self.sent += 1
                self.by_version[int(pred["model_version"])] += 1

        period = 1.0 / self.rate_hz
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="procfleet-io") as pool:
            next_t = time.monotonic()
            while not self._stop.is_set():
                jobs = []
                for agent in self.agents:
                    i = int(rng.integers(len(self.inputs.labels)))
                    noise = np.asarray(rng.normal(0.0, SENSOR_NOISE, self.inputs.clean.shape[1]))
                    jobs.append(pool.submit(one, agent, i, noise))
                for j in jobs:
                    j.result()
                next_t += period
                self._stop.wait(max(0.0, next_t - time.monotonic()))


class ProcFleet:
    """Server, broker and N agent processes in one work directory."""

    def __init__(self, root: Path, devices: int, rate_hz: float) -> None:
        self.root = root
        self.n = devices
        self.rate_hz = rate_hz
        self.admin_token = secrets.token_urlsafe(24)
        self.broker_auth = root / "broker-auth"
        self.broker = Mosquitto(root / "mosquitto", auth_dir=self.broker_auth)
        self.server = ServerProcess(
            root / "server",
            mqtt_port=self.broker.port,
            env={
                "EDGELOOP_BOOTSTRAP_LINE": LINE,
                "EDGELOOP_RETRAIN_THRESHOLD": str(10**6),  # the operator triggers the training
                "EDGELOOP_CANARY_PERCENT": "20",
                "EDGELOOP_MIN_LABELLED": "60",
                "EDGELOOP_MAX_CLASS_RECALL_DROP": "0.5",  # severe drift, as in the demo
                "EDGELOOP_CANARY_MIN_SOAK_S": "4",
                "EDGELOOP_ROLLOUT_TICK_S": "1",
                "EDGELOOP_ADMIN_TOKEN": self.admin_token,
                "EDGELOOP_BROKER_CONFIG_DIR": str(self.broker_auth),
                "EDGELOOP_BROKER_PID_FILE": str(self.broker.pid_file),
                "EDGELOOP_MQTT_USERNAME": "edgeloop-server",
                "EDGELOOP_MQTT_PASSWORD": secrets.token_urlsafe(24),
            },
        )
        self.http = httpx.Client(
            timeout=30.0, headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        self.agents: list[AgentProcess] = []
        self.traffic: Traffic | None = None

    def api(self, method: str, path: str, **kw: Any) -> Any:
        """One API call; a timeout, a refused connection or an HTTP error is FleetFailed,
        naming the call (main prints it with the server log's tail, not a traceback)."""
        try:
            r = self.http.request(method, f"{self.server.url}/api/v1{path}", **kw)
        except httpx.HTTPError as exc:
            raise FleetFailed(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if r.is_error:
            raise FleetFailed(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def start(self) -> None:
        self.server.start()
        wait_for("the broker files", (self.broker_auth / "passwd").exists, 30)
        self.broker.start()
        wait_for(
            "the factory model (v1)",
            lambda: self.api("GET", f"/model-lines/{LINE}")["current_release"],
            300,
        )
        token = self.server.enrollment_token(max_uses=self.n)
        for i in range(self.n):
            device_id = f"proc-{i:03d}"
            state = self.root / "devices" / device_id
            state.mkdir(parents=True, exist_ok=True)
            cfg = {
                "device_id": device_id,
                "model_line": LINE,
                "server_url": self.server.url,
                "mqtt_host": self.broker.host,
                "mqtt_port": self.broker.port,
                "state_dir": str(state),
                "trusted_root_file": str(self.server.root_path),
                "bootstrap_token": token,
                "metrics_interval_s": 1.0,
                "upload_interval_s": 1.0,
            }
            path = state / "agent.json"
            path.write_text(json.dumps(cfg))
            agent = AgentProcess(device_id, path, state / "agent.log")
            agent.spawn()
            self.agents.append(agent)
        deadline = time.monotonic() + START_TIMEOUT_S
        for agent in self.agents:  # all spawned first: they start in parallel
            agent.read_url()
            if time.monotonic() > deadline:
                raise FleetFailed(f"agents took over {START_TIMEOUT_S:.0f} s to start")

    def statuses(self) -> list[dict[str, Any]]:
        out = []
        for agent in self.agents:
            try:
                out.append(httpx.get(f"{agent.url}/status", timeout=10).json())
            except (httpx.HTTPError, ValueError):
                out.append({"device_id": agent.device_id, "unreachable": True})
        return out

    def versions(self) -> Counter[Any]:
        return Counter(s.get("model_version") for s in self.statuses())

    def stop(self) -> None:
        if self.traffic is not None:
            self.traffic.stop()
        for agent in self.agents:
            agent.stop()
        self.server.stop()
        self.broker.stop()
        self.http.close()


def progress(text: str) -> None:
    print(f"\r\033[K{text}", end="", flush=True)


def run(fleet: ProcFleet, *, drift_s: float, timeout_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    fleet.start()
    t_started = time.monotonic()
    print(f"{fleet.n} agent processes started in {t_started - t0:.1f} s; waiting for v1 ...")
    wait_for(f"all {fleet.n} agents to serve v1", lambda: fleet.versions().get(1) == fleet.n, 180)
    rss_v1 = sum(a.rss_bytes() for a in fleet.agents)
    fleet.traffic = Traffic(fleet.agents, Inputs.build(), fleet.rate_hz, drifted=True)
    fleet.traffic.start()
    print(f"all serve v1; drifted traffic for {drift_s:.0f} s (agents upload their mistakes)")
    time.sleep(drift_s)
    job = fleet.api("POST", "/training-jobs", json={"model_line": LINE})
    print(f"operator triggered training job #{job['id']}")
    job = wait_for(
        f"training job #{job['id']}",
        lambda: (
            (j := fleet.api("GET", f"/training-jobs/{job['id']}"))["status"]
            not in ACTIVE_JOB_STATES
            and j
        ),
        timeout_s,
    )
    if job["status"] != "succeeded":
        raise FleetFailed(f"training job ended {job['status']}: {job.get('error')}")
    new = int(job["result_version"])
    rollout = wait_for(
        "the candidate's rollout",
        lambda: next(
            (r for r in fleet.api("GET", f"/rollouts?model_line={LINE}") if r["to_version"] == new),
            None,
        ),
        60,
    )
    fleet.api("POST", f"/rollouts/{rollout['id']}/approve", json={})
    t_approved = time.monotonic()
    print(f"rollout #{rollout['id']} v{rollout['from_version']} -> v{new} approved")
    deadline = t_approved + timeout_s
    final: dict[str, Any] = {}
    while time.monotonic() < deadline:
        final = fleet.api("GET", f"/rollouts/{rollout['id']}")
        counts = fleet.versions()
        progress(
            f"  {final['state']:<10} agents on v{new}: {counts.get(new, 0)}/{fleet.n}  "
            f"(inferences {fleet.traffic.sent}, failed {fleet.traffic.failed})"
        )
        if final["state"] in ("completed", "rolled_back", "aborted"):
            break
        time.sleep(1.0)
    print()
    t_done = time.monotonic()
    statuses = fleet.statuses()
    fleet.traffic.stop()
    committed = sum(
        1 for s in statuses if s.get("model_version") == new and s.get("state") == "committed"
    )
    return {
        "devices": fleet.n,
        "rollout": {
            "id": rollout["id"],
            "state": final.get("state"),
            "reason": final.get("reason"),
        },
        "new_version": new,
        "committed_on_new": committed,
        "agent_states": dict(Counter(str(s.get("state")) for s in statuses)),
        "agent_versions": {
            str(k): v for k, v in Counter(s.get("model_version") for s in statuses).items()
        },
        "approval_to_completed_s": round(t_done - t_approved, 2),
        "agents_start_s": round(t_started - t0, 2),
        "inferences": fleet.traffic.sent,
        "failed_inferences": fleet.traffic.failed,
        "inferences_by_version": {str(k): v for k, v in fleet.traffic.by_version.items()},
        "agents_rss_mb_total_v1": round(rss_v1 / 2**20, 1),
        "agents_rss_mb_mean_v1": round(rss_v1 / 2**20 / fleet.n, 1),
        "unreachable": [s["device_id"] for s in statuses if s.get("unreachable")],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_sim.procfleet", description=__doc__)
    p.add_argument("--devices", type=int, default=50, help="agent processes")
    p.add_argument("--rate", type=float, default=2.0, help="inferences per agent per second")
    p.add_argument("--drift-s", type=float, default=20.0, help="seconds of drifted traffic")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any phase may take")
    p.add_argument("--workdir", type=Path, default=None, help="keep state here")
    p.add_argument("--results", type=Path, default=None, help="write the results JSON here")
    a = p.parse_args(argv)
    root = a.workdir or Path(tempfile.mkdtemp(prefix="edgeloop-procfleet-"))
    fleet = ProcFleet(root, a.devices, a.rate)
    ok = False
    try:
        results = run(fleet, drift_s=a.drift_s, timeout_s=a.timeout)
        ok = results["committed_on_new"] == a.devices and results["rollout"]["state"] == "completed"
        text = json.dumps(results, indent=2)
        print(text)
        if a.results is not None:
            a.results.write_text(text)
    except FleetFailed as exc:
        print(f"\nprocfleet failed: {exc}\nserver log, last lines:\n{fleet.server.log_tail(20)}")
    except KeyboardInterrupt:
        return 130
    finally:
        fleet.stop()
        if ok and a.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            print(f"work directory kept: {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
