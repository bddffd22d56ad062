"""Past one machine, measured: one server against two, and a server SIGKILLed mid-rollout.

Every mode starts from nothing: a fresh PostgreSQL database, the real Mosquitto (password file
and ACL written by server A), production servers (``EDGELOOP_ENVIRONMENT=production``, no
embedded worker, one release key and root made offline as an operator does) sharing an artifact
directory, and one ``edgeloop worker`` process that trains. The worker trains the line's first
model; a fleet of simulated devices (``firmware_sim.swarm``: each device its own MQTT session
and credential, Range download, signature and hash check, probation, status reports) starts on
it. Then one retraining request (``POST /training-jobs`` on server A) goes through the queue:
worker claim -> trained and handed back -> registered and signed by a server's registrar; the
candidate's rollout (one wave, no soak) is approved and the fleet measured until every device
committed.

- ``one-server``: server A and the worker (the baseline);
- ``two-servers``: servers A and B on one MQTT shared subscription group; half the devices
  enroll through A and use it as their HTTP base, half through B; the rollout is created on A
  and approved on B;
- ``failover``: as ``two-servers``, and server A is SIGKILLed once 25 % of the devices have
  committed; if B's record of the rollout is not complete 30 s after the fleet settled, A is
  restarted (the reports the broker queued for A's persistent session wait for it);
- ``failover-pinned`` (only when named): approved on A, so every device downloads from A; A is
  SIGKILLed at 25 % and restarted at the same address 30 s later.

Where devices download from: the target a device is pushed carries ``artifact_url``, an
unsigned hint built by the server that publishes it (``Settings.artifact_url_base``: its own
``EDGELOOP_PUBLIC_URL``/api/v1/artifacts unless ``EDGELOOP_ARTIFACT_BASE_URL`` names a CDN or a
bucket). Approval publishes the wave, so every device downloads from the approving server (B),
whatever its HTTP base; the per-server download counts come from each server's access log.

    .venv/bin/python -m benchmarks.scale_out --devices 1000 --json benchmarks/results/scale_out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.fleet_rollout import at_fraction, parse_ts
from benchmarks.scale_out_report import write_report
from firmware_sim.services import Mosquitto, ServerProcess, WorkerProcess, raise_nofile
from firmware_sim.swarm import (
    NOFILE,
    ONE_WAVE_NO_SOAK,
    RELAXED_LINE,
    Group,
    Swarm,
    drop_pg_database,
    fresh_pg_database,
    machine,
)
from firmware_sim.swarm_device import DeviceConfig

MODES = ("one-server", "two-servers", "failover")
EXTRA_MODES = ("failover-pinned",)  # run when named in --modes
KILL_AT = 0.25  # failover: share of the fleet committed when server A is SIGKILLed
OUTAGE_S = 30.0  # failover-pinned: seconds A stays down before its supervisor restarts it
HTTP_CONNECTIONS = 64  # the swarm's HTTP connections in all (split between its halves)
METRICS_INTERVAL_S = 20.0  # seconds per device metrics window
ROLLOUT_TIMEOUT_S = 300.0  # seconds from approval the fleet is given to commit
SERVER_SETTLE_S = 30.0  # seconds after the fleet settles for the server's view to catch up
RESTART_SETTLE_S = 180.0  # seconds for it after A's restart (past the 120 s install timeout)
SAMPLE_S = 0.25  # seconds between two looks at the processes (RSS peaks, CPU)
# Production defaults, stated in the report (server.core.config.Settings).
JOB_POLL_S = 1.0  # a worker's look for queued jobs
REGISTRAR_POLL_S = 1.0  # a server's look for trained jobs
ROLLOUT_TICK_S = 2.0  # the rollout engine's tick


def cpu_s(p: psutil.Process, *, children: bool = False) -> float:
    t = p.cpu_times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


def rss_tree(p: psutil.Process) -> tuple[int, int]:
    """(the process's RSS, its children's RSS summed), bytes; (0, 0) once it is gone."""
    try:
        own = p.memory_info().rss
        kids = 0
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                kids += c.memory_info().rss
        return own, kids
    except psutil.Error:
        return 0, 0


@dataclass
class Meter:
    """CPU seconds and peak RSS of one process over a phase (sampled; the last sample stays
    when the process dies)."""

    proc: psutil.Process
    children: bool = False
    cpu0: float = 0.0
    cpu_last: float = 0.0
    rss_peak: int = 0
    child_rss_peak: int = 0

    def start(self) -> Meter:
        self.cpu0 = self.cpu_last = cpu_s(self.proc, children=self.children)
        self.rss_peak = self.child_rss_peak = 0
        self.sample()
        return self

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.cpu_last = cpu_s(self.proc, children=self.children)
        own, kids = rss_tree(self.proc)
        self.rss_peak = max(self.rss_peak, own)
        self.child_rss_peak = max(self.child_rss_peak, kids)

    def figures(self) -> dict[str, float]:
        out = {
            "cpu_s": round(self.cpu_last - self.cpu0, 2),
            "rss_peak_mib": round(self.rss_peak / 2**20, 1),
        }
        if self.children:
            out["children_rss_peak_mib"] = round(self.child_rss_peak / 2**20, 1)
        return out


@dataclass
class Cluster:
    """Mosquitto, ``servers`` edgeloop servers and one worker on a fresh database."""

    root: Path
    pg_base: str
    servers: int
    devices: int
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    pg_name: str | None = None
    db_url: str = ""
    procs: list[ServerProcess] = field(default_factory=list)
    worker: WorkerProcess | None = None
    broker: Mosquitto | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def keys(self) -> tuple[Path, Path]:
        """The release key and root v1 every server loads, made offline (``edgeloop keys``)."""
        keys, trust = self.root / "shared" / "keys", self.root / "shared" / "trust"
        cli = [sys.executable, "-m", "server.cli.main", "keys"]
        subprocess.run([*cli, "init", str(keys)], check=True, capture_output=True)
        pub = str(keys / "signing.pub.pem")
        subprocess.run(
            [*cli, "init-root", "--out", str(trust), "--release-key-pub", pub],
            check=True,
            capture_output=True,
        )
        return keys / "signing.pem", trust

    def start(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_url, self.pg_name = fresh_pg_database(self.pg_base)
        key, trust = self.keys()
        artifacts = self.root / "shared" / "artifacts"
        line = self.root / "line.json"
        line.write_text(json.dumps(RELAXED_LINE))
        auth_dir = self.root / "broker-auth"
        self.broker = Mosquitto(
            self.root / "mosquitto",
            auth_dir=auth_dir,
            max_connections=self.devices + 1000,
            nofile=NOFILE,
        )
        env = {
            "EDGELOOP_ENVIRONMENT": "production",
            "EDGELOOP_MQTT_ALLOW_PLAINTEXT": "true",  # a loopback broker
            "EDGELOOP_EMBEDDED_WORKER": "false",
            "EDGELOOP_DATABASE_URL": self.db_url,
            "EDGELOOP_ADMIN_TOKEN": self.admin_token,
            "EDGELOOP_ARTIFACT_STORE_URL": artifacts.as_uri(),
            "EDGELOOP_SIGNING_KEY_PATH": str(key),
            "EDGELOOP_TRUST_DIR": str(trust),
            "EDGELOOP_MQTT_USERNAME": "edgeloop-server",
            "EDGELOOP_MQTT_PASSWORD": secrets.token_urlsafe(24),
            "EDGELOOP_BOOTSTRAP_LINE": "digits",
            "EDGELOOP_BOOTSTRAP_CONFIG": str(line),
            "EDGELOOP_AUTO_ROLLOUT": "false",
            "EDGELOOP_RETRAIN_THRESHOLD": "100000000",  # the benchmark asks for its training
            "EDGELOOP_SCREEN_LABELS": "false",
            # Propagation is measured, not model quality (as in firmware_sim.swarm.Stack).
            "EDGELOOP_MAX_ACCURACY_DROP": "1.0",
            "EDGELOOP_MAX_LATENCY_RATIO": "100",
        }
        if self.servers > 1:
            env["EDGELOOP_MQTT_SHARED_GROUP"] = "edgeloop-server"
        for i in range(self.servers):
            name = "ab"[i]
            own = dict(env)
            if i == 0:
                # Server A writes the broker's password file and ACL and signals it (the broker
                # on its host, as in docker-compose.yml); B's enrollments reach the broker at
                # A's next rewrite, which reads every device from the shared database.
                own["EDGELOOP_BROKER_CONFIG_DIR"] = str(auth_dir)
                own["EDGELOOP_BROKER_PID_FILE"] = str(self.broker.pid_file)
            self.procs.append(
                ServerProcess(
                    self.root / f"server-{name}", mqtt_port=self.broker.port, env=own, nofile=NOFILE
                ).start(timeout=120)
            )
            if i == 0:
                deadline = time.monotonic() + 30
                while not (auth_dir / "passwd").exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError("server A wrote no broker password file")
                    time.sleep(0.1)
                self.broker.start()
        self.worker = WorkerProcess(
            self.root / "worker", database_url=self.db_url, artifact_store_url=artifacts.as_uri()
        ).start()
        return self

    def api(self, server: ServerProcess, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(
            method, f"{server.url}/api/v1{path}", headers=self.headers, timeout=120, **kw
        )
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def named(self) -> list[tuple[str, ServerProcess]]:
        """("A", server A), ("B", server B)."""
        return list(zip("AB", self.procs, strict=False))

    def wait_champion(self, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, httpx.HTTPError):
                v = self.api(self.procs[0], "GET", "/model-lines/digits").get("champion_version")
                if v:
                    return int(v)
            time.sleep(1)
        raise TimeoutError(f"the line's first model was not trained in time:\n{self.tails()}")

    def tails(self) -> str:
        parts = [f"--- {p.log_path}\n{p.log_tail(20)}" for p in self.procs]
        if self.worker is not None:
            parts.append(f"--- {self.worker.log_path}\n{self.worker.log_tail(20)}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        for p in self.procs:
            p.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.pg_name:
            with contextlib.suppress(Exception):
                drop_pg_database(self.pg_base, self.pg_name)


def health(server: ServerProcess) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError):
        return dict(httpx.get(f"{server.url}/healthz", timeout=30).json())
    return None


def downloads(server: ServerProcess, sha: str) -> int:
    """Successful GETs of artifact ``sha`` in the server's access log."""
    pattern = re.compile(rf'"GET /api/v1/artifacts/{sha} HTTP/1.1" (200|206)')
    return len(pattern.findall(server.log_path.read_text(errors="replace")))


def ingest_losses(log_path: Path) -> dict[str, int]:
    """Reports a server's ingest writer dropped ("database unavailable, N reports lost"), and
    how many of those drops were PostgreSQL deadlocks, from its log."""
    text = log_path.read_text(errors="replace")
    lost = re.findall(r"database unavailable, (\d+) reports lost: (.*)", text)
    return {
        "reports_lost": sum(int(k) for k, _ in lost),
        "drops": len(lost),
        "deadlocks": sum(1 for _, why in lost if "DeadlockDetected" in why),
    }


def registered_by(servers: Sequence[ServerProcess], job_id: int) -> str | None:
    """Which server's registrar registered job ``job_id`` (its log line)."""
    for name, s in zip("AB", servers, strict=False):
        if f"training job {job_id}: version" in s.log_path.read_text(errors="replace"):
            return name
    return None


async def server_view(
    api: Any, server: ServerProcess, rid: int, t0: float, wait_s: float
) -> dict[str, Any]:
    """The rollout's state and its members' states on ``server``, polled until the rollout
    leaves its running states or ``wait_s`` passes (seen_s: seconds since approval)."""
    deadline = time.monotonic() + wait_s
    seen = None
    while True:
        rollout = await api(server, "GET", f"/rollouts/{rid}")
        if rollout["state"] in ("completed", "rolled_back", "paused", "aborted"):
            seen = round(time.time() - t0, 2)
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    members = await api(server, "GET", f"/rollouts/{rid}/devices")
    states = Counter(m["state"] for m in members)
    return {"state": rollout["state"], "seen_s": seen, "members": dict(states)}


def tally(swarms: Sequence[Swarm], release: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in swarms:
        for k, v in s.tally(release).items():
            out[k] = out.get(k, 0) + v
    return out


async def run_mode(mode: str, n: int, *, pg: str, root: Path, quiet: bool) -> dict[str, Any]:
    """One mode from an empty database to the fleet on the retrained model."""
    loop = asyncio.get_running_loop()

    async def api(server: ServerProcess, method: str, path: str, **kw: Any) -> Any:
        return await loop.run_in_executor(
            None, functools.partial(cluster.api, server, method, path, **kw)
        )

    say = (lambda *_a: None) if quiet else (lambda m: print(f"  [{mode}] {m}", flush=True))
    load_start = os.getloadavg()
    two = mode != "one-server"
    cluster = Cluster(root / mode, pg, servers=2 if two else 1, devices=n)
    swarms: list[Swarm] = []
    try:
        await loop.run_in_executor(None, cluster.start)
        a = cluster.procs[0]
        b = cluster.procs[-1]  # server B (A itself with one server): the server's view
        approver = a if mode == "failover-pinned" else b
        assert cluster.worker is not None and cluster.broker is not None
        v1 = await loop.run_in_executor(None, cluster.wait_champion)
        say(f"servers {[p.url for p in cluster.procs]}, worker pid {cluster.worker.pid}: v{v1}")
        trusted_root = (root / mode / "shared" / "trust" / "1.root.json").read_bytes()
        # Half the devices on each server (their HTTP base: enrollment, the factory image,
        # target polls); B's half enrolls first, so A's last broker rewrite holds everyone.
        halves = [(b, n // 2, "b"), (a, n - n // 2, "a")] if two else [(a, n, "a")]
        for server, count, prefix in halves:
            config = DeviceConfig(
                server_url=server.url,
                mqtt_host="127.0.0.1",
                mqtt_port=cluster.broker.port,
                metrics_interval_s=METRICS_INTERVAL_S,
            )
            swarm = Swarm(
                config,
                trusted_root=trusted_root,
                groups=[Group("healthy", 1.0)],
                devices=count,
                id_prefix=f"{prefix}",
                http_connections=HTTP_CONNECTIONS // len(halves),
            )
            await swarm.open()
            swarms.append(swarm)
            token = await loop.run_in_executor(
                None, functools.partial(server.enrollment_token, max_uses=count)
            )
            t = time.time()
            await swarm.enroll(token, swarm.plan_groups())
            say(f"{count} devices enrolled through {server.url} in {time.time() - t:.1f} s")
        for swarm in swarms:
            swarm.provision(swarm.devices, await swarm.factory_image(swarm.devices[0]))
            swarm.boot(swarm.devices)
        for swarm in swarms:
            online = await swarm.wait_online(swarm.devices, timeout=300)
            if online < len(swarm.devices):
                raise RuntimeError(f"{len(swarm.devices) - online} devices never connected")
        for swarm in swarms:
            swarm.start_traffic()
        await asyncio.sleep(METRICS_INTERVAL_S + 2)  # a metrics window of the champion
        load_trigger = os.getloadavg()

        # 1. Training: trigger -> claimed -> trained -> registered and signed.
        meters = {name: Meter(psutil.Process(p.proc.pid)) for name, p in cluster.named()}  # type: ignore[union-attr]
        worker_meter = Meter(psutil.Process(cluster.worker.pid), children=True)
        for m in (*meters.values(), worker_meter):
            m.start()
        t_trigger = time.time()
        job = await api(a, "POST", "/training-jobs", json={"model_line": "digits"})
        while True:
            for m in (*meters.values(), worker_meter):
                m.sample()
            j = await api(a, "GET", f"/training-jobs/{job['id']}")
            if j["status"] not in ("queued", "running", "trained"):
                break
            if time.time() - t_trigger > 900:
                raise TimeoutError(f"training did not finish:\n{cluster.tails()}")
            await asyncio.sleep(SAMPLE_S)
        if j["status"] != "succeeded":
            raise RuntimeError(f"training job ended {j['status']}: {j.get('error')}")
        worker_meter.sample()
        created, started = parse_ts(j["created_at"]), parse_ts(j["started_at"])
        trained, finished = parse_ts(j["trained_at"]), parse_ts(j["finished_at"])
        assert created and started and trained and finished
        training = {
            "job_id": j["id"],
            "trigger_to_claimed_s": round(started - created, 3),
            "worker_training_s": round(trained - started, 3),
            "trained_to_registered_s": round(finished - trained, 3),
            "trigger_to_registered_s": round(finished - created, 3),
            "request_to_registered_seen_s": round(time.time() - t_trigger, 3),
            "registered_by": registered_by(cluster.procs, j["id"]),
            "worker": worker_meter.figures(),
            "servers": {k: m.figures() for k, m in meters.items()},
        }
        v2 = int(j["result_version"])
        sha = (await api(a, "GET", f"/model-lines/digits/versions/{v2}"))["sha256"]
        say(
            f"v{v2}: claimed +{training['trigger_to_claimed_s']} s, trained in "
            f"{training['worker_training_s']} s, registered +{training['trained_to_registered_s']}"
            f" s by {training['registered_by']}"
        )

        # 2. The rollout: created on A, approved on B (A with one server).
        body = {"model_line": "digits", "model_version": v2, "waves": ONE_WAVE_NO_SOAK}
        rid = int((await api(a, "POST", "/rollouts", json=body))["id"])
        health0 = {name: health(p) for name, p in cluster.named()}
        health_last = dict(health0)
        for m in meters.values():
            m.start()
        load_approval = os.getloadavg()
        t0 = time.time()
        await api(approver, "POST", f"/rollouts/{rid}/approve", json={})
        release = int((await api(b, "GET", f"/rollouts/{rid}"))["release"])
        killed_at: float | None = None
        restarting: asyncio.Future[Any] | None = None
        restarted_at: float | None = None
        committed_at_kill = 0
        deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
        while time.monotonic() < deadline:
            for m in meters.values():
                m.sample()
            counts = tally(swarms, release)
            done = counts.get("committed", 0)
            if not quiet:
                print(
                    f"\r  [{mode}] t+{time.time() - t0:6.1f}s committed {done:>6}/{n} "
                    f"retrying {counts.get('retrying', 0):>5} failed {counts.get('failed', 0):>5}",
                    end="",
                    flush=True,
                )
            if mode.startswith("failover") and killed_at is None and done >= math.ceil(KILL_AT * n):
                health_last["A"] = health(a)
                a.stop(kill=True)  # SIGKILL
                killed_at = time.time() - t0
                committed_at_kill = done
            if (
                mode == "failover-pinned"
                and killed_at is not None
                and restarting is None
                and time.time() - t0 >= killed_at + OUTAGE_S
            ):
                # Its supervisor restarts A (the same address: the URL the devices hold).
                restarted_at = time.time() - t0
                restarting = loop.run_in_executor(None, functools.partial(a.start, timeout=120))
            if done + counts.get("failed", 0) >= n:
                break
            await asyncio.sleep(SAMPLE_S)
        if not quiet:
            print()
        fleet_settled_s = time.time() - t0
        if restarting is not None:
            await restarting
        load_end = os.getloadavg()
        # The server's view: the rollout's state through a live server, until it completes.
        view = await server_view(api, b, rid, t0, SERVER_SETTLE_S)
        for name, p in cluster.named():
            if p.proc is not None and not (name == "A" and killed_at is not None):
                health_last[name] = health(p)  # a killed A's counters: read before the kill
        restart: dict[str, Any] | None = None
        if killed_at is not None and restarting is None and view["state"] != "completed":
            # The reports the broker queued for A's persistent session (its share of the
            # shared subscription) wait for A: restart it, as a supervisor would.
            t_restart = time.time()
            await loop.run_in_executor(None, functools.partial(a.start, timeout=120))
            restart = {
                "restarted_at_s": round(t_restart - t0, 2),
                "up_after_s": round(time.time() - t_restart, 2),
                **await server_view(api, b, rid, t0, RESTART_SETTLE_S),
            }
        commits: list[float] = []
        not_committed: list[dict[str, Any]] = []
        for s in swarms:
            for d in s.devices:
                c = d.times.get(f"commit:{release}")
                if c is not None:
                    commits.append(c - t0)
                else:
                    job_ = d.flash.job
                    not_committed.append(
                        {
                            "device_id": d.device_id,
                            "state": job_.state.value if job_ is not None else "idle",
                            "reason": job_.reason if job_ is not None else None,
                        }
                    )
        servers: dict[str, Any] = {}
        for name, p in cluster.named():
            h0, h1 = (
                (health0.get(name) or {}).get("mqtt") or {},
                (health_last.get(name) or {}).get("mqtt") or {},
            )
            servers[name] = {
                "url": p.url,
                "artifact_downloads": downloads(p, sha),
                **ingest_losses(p.log_path),
                "mqtt_received": h1.get("received", 0) - h0.get("received", 0),
                "mqtt_published": h1.get("published", 0) - h0.get("published", 0),
                **meters[name].figures(),
                "killed_at_s": round(killed_at, 2)
                if name == "A" and killed_at is not None
                else None,
            }
        reasons: dict[str, int] = {}
        for x in not_committed:
            key = f"{x['state']}: {(x['reason'] or '')[:80]}"
            reasons[key] = reasons.get(key, 0) + 1
        result = {
            "mode": mode,
            "devices": n,
            "servers": servers,
            "training": training,
            "rollout_id": rid,
            "version": v2,
            "approved_on": "B" if approver is not a else "A",
            "a_restarted_at_s": round(restarted_at, 2) if restarted_at is not None else None,
            # Devices that reported a failed attempt (a download that gave up, retried later).
            "devices_failed_once": sum(
                1
                for s in swarms
                for d in s.devices
                if any(st == "failed" and ts >= t0 for st, ts in d.reports)
            ),
            "committed": len(commits),
            "t50_s": at_fraction(commits, n, 0.50),
            "t99_s": at_fraction(commits, n, 0.99),
            "t100_s": at_fraction(commits, n, 1.00),
            "fleet_settled_s": round(fleet_settled_s, 2),
            "killed_a_at_s": round(killed_at, 2) if killed_at is not None else None,
            "committed_at_kill": committed_at_kill if killed_at is not None else None,
            "not_committed": len(not_committed),
            "not_committed_reasons": reasons,
            "not_committed_sample": not_committed[:20],
            "rollout_state": view["state"],
            "rollout_state_seen_s": view["seen_s"],
            "server_members": view["members"],
            "after_restart_of_a": restart,
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_trigger": [round(x, 2) for x in load_trigger],
            "load_avg_approval": [round(x, 2) for x in load_approval],
            "load_avg_end": [round(x, 2) for x in load_end],
            "started_at": datetime.fromtimestamp(t0).astimezone().isoformat(timespec="seconds"),
            "commit_times_s": [round(c, 3) for c in sorted(commits)],
            "work_dir": str(root / mode),
        }
        return result
    finally:
        for swarm in swarms:
            await swarm.close()
        await loop.run_in_executor(None, cluster.stop)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_out", description=__doc__.split("\n")[0]
    )
    p.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    p.add_argument(
        "--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES + EXTRA_MODES)
    )
    p.add_argument("--pg", default=None, help="PostgreSQL URL (default: var/test-pg-url)")
    p.add_argument("--json", type=Path, help="write every figure here (after each mode)")
    p.add_argument(
        "--append", action="store_true", help="add this run as one more set to --json's sets"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="report folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--report-only", action="store_true", help="redraw the report from --json, run nothing"
    )
    a = p.parse_args(argv)
    if a.report_only:
        if not a.json:
            p.error("--report-only needs --json")
        print(f"report: {write_report(json.loads(a.json.read_text()), a.out)}")
        return 0
    modes = [x.strip() for x in a.modes.split(",") if x.strip()]
    if bad := [x for x in modes if x not in MODES + EXTRA_MODES]:
        p.error(f"unknown mode(s) {bad}")
    pg = a.pg or Path("var/test-pg-url").read_text().strip()
    raise_nofile(NOFILE)
    root = Path(tempfile.mkdtemp(prefix="edgeloop-scale-out-"))
    sets: list[list[dict[str, Any]]] = []
    if a.append and a.json and a.json.exists():
        sets = list(json.loads(a.json.read_text()).get("sets", []))
    runs: list[dict[str, Any]] = []
    sets.append(runs)
    result: dict[str, Any] = {
        "machine": machine(),
        "devices": a.devices,
        "settings": {
            "job_poll_s": JOB_POLL_S,
            "registrar_poll_s": REGISTRAR_POLL_S,
            "rollout_tick_s": ROLLOUT_TICK_S,
            "kill_at": KILL_AT,
        },
        "sets": sets,
    }
    for mode in modes:
        runs.append(asyncio.run(run_mode(mode, a.devices, pg=pg, root=root, quiet=a.quiet)))
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
    report = write_report(result, a.out)
    for r in runs:
        tr = r["training"]
        print(
            f"{r['mode']:<12} claimed {tr['trigger_to_claimed_s']} s, trained "
            f"{tr['worker_training_s']} s, registered +{tr['trained_to_registered_s']} s "
            f"({tr['registered_by']}); t50 {r['t50_s']} t99 {r['t99_s']} t100 {r['t100_s']} s; "
            f"committed {r['committed']}/{r['devices']}; "
            + "; ".join(
                f"{k}: {v['artifact_downloads']} downloads, {v['mqtt_received']} reports, "
                f"CPU {v['cpu_s']} s, RSS {v['rss_peak_mib']} MiB"
                for k, v in r["servers"].items()
            )
        )
    print(f"report: {report}")
    print(f"work directory (server, worker and broker logs, kept): {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
