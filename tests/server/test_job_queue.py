"""The durable training queue: leases, crash-retry, and one trigger -> one training across
server processes (real uvicorn servers in subprocesses, real PostgreSQL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from firmware_sim.services import ServerProcess
from server.db import job_queue
from server.db.base import utcnow
from server.db.registry import TrainingJob
from server.main import create_app
from tests.authkit import FleetAuth, bootstrap_token, enroll
from tests.conftest import TEST_ADMIN_TOKEN, auth_headers, write_key_pair
from tests.server.conftest import (
    authed_client,
    create_line,
    fake_python,
    make_settings,
    sample,
    services_of,
    wait_for,
)


def _client(tmp_path: Path, db_url: str, signing_key, mode: str = "pass", **kw):

    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, db_url, signing_key_path=priv, training_python=fake_python(tmp_path, mode), **kw
    )
    return authed_client(create_app(settings))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_job_whose_runner_stopped_heartbeating_is_retried(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with _client(tmp_path, db_url, signing_key, job_lease_s=30) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        with services.sessions() as s:
            job = job_queue.claim_job(s, now=utcnow(), runner="other-host:123:abcd")
            assert job is not None and job.attempts == 1
        # Within its lease another runner's job is left alone...
        assert services.jobs.recover() == ([], [])
        assert services.jobs.run_once() is None
        # ...and after the lease it is queued again and trained by this runner.
        with services.sessions() as s:
            s.execute(update(TrainingJob).values(heartbeat_at=utcnow() - timedelta(seconds=31)))
            s.commit()
        assert services.jobs.run_once() == job.id
        got = client.get(f"/api/v1/training-jobs/{job.id}").json()
        assert got["status"] == "succeeded" and got["attempts"] == 2
        assert got["claimed_by"] == services.jobs.identity


def test_a_dead_runner_on_this_host_is_detected_without_waiting_for_the_lease(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with _client(tmp_path, db_url, signing_key, job_lease_s=3600) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        ghost = f"{socket.gethostname()[:64]}:{_dead_pid()}:dead0000"
        with services.sessions() as s:
            job = job_queue.claim_job(s, now=utcnow(), runner=ghost)
            assert job is not None
        assert services.jobs.recover() == ([job.id], [])
        got = client.get(f"/api/v1/training-jobs/{job.id}").json()
        assert got["status"] == "queued" and "lost" in got["error"]


def test_out_of_attempts_a_lost_job_fails(tmp_path: Path, db_url: str, signing_key) -> None:
    with _client(tmp_path, db_url, signing_key, training_max_attempts=1) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        with services.sessions() as s:
            job = job_queue.claim_job(s, now=utcnow(), runner="h:1:x", max_attempts=1)
            assert job is not None
            s.execute(update(TrainingJob).values(heartbeat_at=utcnow() - timedelta(hours=1)))
            s.commit()
        assert services.jobs.recover() == ([], [job.id])
        got = client.get(f"/api/v1/training-jobs/{job.id}").json()
        assert got["status"] == "failed" and "gave up after 1 attempt" in got["error"]


def test_the_database_refuses_a_second_active_job_per_line(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with _client(tmp_path, db_url, signing_key) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        with services.sessions() as s:
            s.add(TrainingJob(model_line="digits", status="queued", trigger="manual"))
            with pytest.raises(IntegrityError):
                s.commit()
            s.rollback()
            # Finished jobs do not count.
            s.execute(update(TrainingJob).values(status="failed"))
            s.add(TrainingJob(model_line="digits", status="queued", trigger="manual"))
            s.commit()


# ---------------------------------------------------------------- real server processes


def _server_env(tmp_path: Path, db_url: str, mode: str, **extra: str) -> dict[str, str]:
    return {
        "EDGELOOP_DATABASE_URL": db_url,
        "EDGELOOP_MQTT_ENABLED": "false",
        "EDGELOOP_BOOTSTRAP_LINE": "digits",
        "EDGELOOP_TRAINING_PYTHON": fake_python(tmp_path, mode),
        "EDGELOOP_JOB_POLL_S": "0.2",
        "EDGELOOP_JOB_HEARTBEAT_S": "0.3",
        "EDGELOOP_JOB_LEASE_S": "5",
        "EDGELOOP_TRAINING_RETRY_BACKOFF_S": "0",
        "FAKE_TRAINER_RUNS": str(tmp_path / "runs.log"),
        "EDGELOOP_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
        **extra,
    }


ADMIN = auth_headers(TEST_ADMIN_TOKEN)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def _jobs(url: str) -> list[dict]:
    return httpx.get(f"{url}/api/v1/training-jobs", headers=ADMIN, timeout=10).json()


def _runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs.log"
    return path.read_text().splitlines() if path.exists() else []


def test_a_server_killed_mid_training_retries_the_job_after_restart(
    tmp_path: Path, db_url: str, servers: list[ServerProcess]
) -> None:
    env = _server_env(tmp_path, db_url, "slow", FAKE_TRAINER_SLEEP_S="3")
    server = ServerProcess(tmp_path / "srv", mqtt_port=1, env=env)
    servers.append(server.start())
    wait_for(
        lambda: [j for j in _jobs(server.url) if j["status"] == "running"],
        timeout=60,
        what="the initial job running",
    )
    server.stop(kill=True)  # SIGKILL: no chance to clean up
    restarted = ServerProcess(tmp_path / "srv", mqtt_port=1, env=env, port=server.port)
    servers.append(restarted.start())
    job = wait_for(
        lambda: next((j for j in _jobs(restarted.url) if j["status"] == "succeeded"), None),
        timeout=90,
        what="the job retried to success",
    )
    assert job["trigger"] == "initial" and job["attempts"] == 2
    assert sorted(_runs(tmp_path)) == [f"{job['id']} attempt-1", f"{job['id']} attempt-2"]
    versions = httpx.get(
        f"{restarted.url}/api/v1/model-lines/digits/versions", headers=ADMIN
    ).json()
    assert [(v["version"], v["job_id"]) for v in versions] == [(1, job["id"])]


def test_two_servers_on_one_postgres_train_each_trigger_once(
    tmp_path: Path, pg_url: str, servers: list[ServerProcess]
) -> None:
    env = _server_env(
        tmp_path, pg_url, "slow", FAKE_TRAINER_SLEEP_S="2", EDGELOOP_RETRAIN_THRESHOLD="20"
    )
    shared = tmp_path / "shared"  # one data dir: artifacts and keys are shared, as in production
    a = ServerProcess(shared, mqtt_port=1, env=env)
    servers.append(a.start())
    b = ServerProcess(shared, mqtt_port=1, env=env)
    servers.append(b.start())
    urls = [a.url, b.url]
    wait_for(
        lambda: httpx.get(f"{a.url}/api/v1/model-lines/digits", headers=ADMIN).json()[
            "current_release"
        ],
        timeout=60,
        what="the initial model",
    )
    fleets = [httpx.Client(base_url=u, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=30) for u in urls]
    token = bootstrap_token(fleets[0], max_uses=4)
    creds: dict[str, dict[str, str]] = {}
    for i in range(4):  # enrolled on either server: both share the database
        device = enroll(fleets[i % 2], f"cam-{i}", "digits", token=token)
        creds[f"cam-{i}"] = auth_headers(device["credential"])
    for f in fleets:
        f.close()

    accepted: list[int] = []

    def upload(k: int) -> None:
        for b_ in range(3):
            batch = [sample(f"cam-{k}", sample_id=f"k{k}-{b_}-{i}") for i in range(10)]
            r = httpx.post(
                f"{urls[(k + b_) % 2]}/api/v1/samples",
                json={"samples": batch},
                headers=creds[f"cam-{k}"],
                timeout=60,  # the first uploads load the screening model on a loaded machine
            )
            assert r.status_code == 200, r.text
            accepted.append(r.json()["accepted"])

    threads = [threading.Thread(target=upload, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(accepted) == 120

    def idle() -> list[dict] | None:
        jobs = _jobs(a.url)
        active = ("queued", "running", "trained")  # trained: not registered yet
        return jobs if all(j["status"] not in active for j in jobs) else None

    jobs = wait_for(idle, timeout=120, what="all jobs finished")
    threshold_jobs = [j for j in jobs if j["trigger"] == "threshold"]
    assert 1 <= len(threshold_jobs) <= 120 // 20
    # Every job was claimed and trained exactly once, by one of the two servers.
    runs = _runs(tmp_path)
    assert sorted(runs) == sorted(f"{j['id']} attempt-1" for j in jobs), runs
    assert all(j["attempts"] == 1 and j["status"] == "succeeded" for j in jobs), jobs
    versions = httpx.get(f"{a.url}/api/v1/model-lines/digits/versions", headers=ADMIN).json()
    assert sorted(v["job_id"] for v in versions) == sorted(j["id"] for j in jobs)
    assert len({j["claimed_by"] for j in jobs}) >= 1

    # Concurrent manual triggers on both servers: exactly one training is queued.
    codes: list[int] = []

    def trigger(k: int) -> None:
        r = httpx.post(
            f"{urls[k % 2]}/api/v1/training-jobs", json={"model_line": "digits"}, headers=ADMIN
        )
        codes.append(r.status_code)

    threads = [threading.Thread(target=trigger, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] + [409] * 7, codes
    jobs = wait_for(idle, timeout=60, what="the manual job finished")
    manual = [j for j in jobs if j["trigger"] == "manual"]
    assert len(manual) == 1 and manual[0]["status"] == "succeeded"
    assert _runs(tmp_path).count(f"{manual[0]['id']} attempt-1") == 1


def test_the_trainer_exits_when_its_runner_dies(tmp_path: Path) -> None:
    """``python -m training`` started by a runner that dies stops instead of training on."""
    script = (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, EDGELOOP_TRAINER_PARENT_PID=str(os.getpid()))\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import training.__main__ as m, time; "
        "m._exit_with_parent(); time.sleep(60)'], env=env)\n"
        "print(p.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    child = int(out.stdout.strip())

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # A zombie re-parented to init is reaped by it; treat "Z" as gone too.
        try:
            return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
        except OSError:
            return True

    wait_for(gone, timeout=20, what="the orphaned trainer to exit")
