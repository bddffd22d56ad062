"""A job's life split in two: trained by a worker, registered by a server (in-process parts).

A worker (``server.retrain.worker``) and the server's registrar (``server.retrain.registrar``) are
built on the same database and artifact store as the app, with the fake trainer; the real-process
version (two servers, worker processes, a fleet) is ``tests/rollouts/test_training_workers.py``.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from typer.testing import CliRunner

from server.cli.main import app as cli_app
from server.db import audit, job_queue
from server.db.registry import ModelLine, TrainingJob
from server.main import create_app
from server.retrain.worker import TrainingWorker
from server.services import Services
from tests.conftest import write_key_pair
from tests.server.conftest import (
    authed_client,
    create_line,
    fake_python,
    make_settings,
    services_of,
    wait_for,
)


def _app(tmp_path: Path, db_url: str, signing_key, mode: str = "pass", **kw) -> TestClient:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        training_python=fake_python(tmp_path, mode),
        embedded_worker=False,
        training_retry_backoff_s=0,
        **kw,
    )
    return authed_client(create_app(settings))


def _worker(services: Services) -> TrainingWorker:
    """A worker as `edgeloop worker` builds one: same database and store, its own identity."""
    return TrainingWorker(
        settings=services.settings, sessions=services.sessions, store=services.store
    )


def _job(services: Services, job_id: int) -> TrainingJob:
    with services.sessions() as s:
        job = job_queue.get_job(s, job_id=job_id)
        s.expunge(job)
        return job


def test_a_worker_trains_and_a_server_registers(tmp_path: Path, db_url: str, signing_key) -> None:
    with _app(tmp_path, db_url, signing_key) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        assert services.jobs.worker is None
        assert services.jobs.run_once() is None  # the server trains nothing itself
        worker = _worker(services)
        job_id = worker.run_once()
        assert job_id is not None
        job = _job(services, job_id)
        assert job.status == "trained" and job.claimed_by == worker.identity
        for sha in (job.result_sha256, job.result_report_sha256, job.result_base_sha256):
            assert sha and services.store.exists(sha)
        line = client.get("/api/v1/model-lines/digits").json()
        assert line["champion_version"] is None  # not registered yet: no version, no release
        assert client.get("/api/v1/model-lines/digits/versions").json() == []

        assert services.jobs.run_once() == job_id  # the registrar
        got = client.get(f"/api/v1/training-jobs/{job_id}").json()
        assert got["status"] == "succeeded" and got["result_version"] == 1
        line = client.get("/api/v1/model-lines/digits").json()
        assert (line["champion_version"], line["current_release"]) == (1, 1)
        v1 = client.get("/api/v1/model-lines/digits/versions/1").json()
        assert v1["sha256"] == job.result_sha256 and v1["job_id"] == job_id
        with services.sessions() as s:
            ml = s.get(ModelLine, "digits")
            assert ml is not None and ml.base_pool_sha256 == job.result_base_sha256
        assert services.jobs.run_once() is None  # registered exactly once


def test_the_registrar_refuses_an_artifact_whose_bytes_do_not_match(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with _app(tmp_path, db_url, signing_key, training_max_attempts=2) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        worker = _worker(services)
        job_id = worker.run_once()
        assert job_id is not None
        sha = _job(services, job_id).result_sha256
        assert sha is not None
        services.store.local_path(sha).write_bytes(b"not the model the worker trained")
        assert services.jobs.run_once() == job_id
        got = client.get(f"/api/v1/training-jobs/{job_id}").json()
        assert got["status"] == "queued", got
        assert got["error"].startswith("attempt 1: result refused by the server: model.onnx")
        assert f"the job recorded {sha}" in got["error"] and "(will retry)" in got["error"]
        assert client.get("/api/v1/model-lines/digits/versions").json() == []
        # Out of attempts, the same refusal fails the job.
        assert worker.run_once() == job_id
        sha = _job(services, job_id).result_sha256
        assert sha is not None
        services.store.delete(sha)
        assert services.jobs.run_once() == job_id
        got = client.get(f"/api/v1/training-jobs/{job_id}").json()
        assert got["status"] == "failed" and got["attempts"] == 2
        assert "is not in the artifact store" in got["error"]


def test_a_worker_that_lost_its_job_records_nothing_on_it(
    tmp_path: Path, db_url: str, signing_key, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER_SLEEP_S", "2")
    with _app(tmp_path, db_url, signing_key, "slow", job_heartbeat_s=0.2) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        worker = _worker(services)
        done: list[int | None] = []
        thread = threading.Thread(target=lambda: done.append(worker.run_once()))
        thread.start()
        job = wait_for(
            lambda: (j := _job(services, 1)).status == "running" and j,
            what="the job running",
        )
        assert job.claimed_by == worker.identity
        # What recovery does to a job whose lease expired: queued again, for another worker.
        with services.sessions() as s:
            s.execute(
                update(TrainingJob).values(status="queued", claimed_by=None, error="lost (test)")
            )
            s.commit()
        thread.join(60)
        assert done == [1]
        job = _job(services, 1)
        assert (job.status, job.error, job.result_sha256) == ("queued", "lost (test)", None)
        with services.sessions() as s:
            refused = audit.list_entries(s, action="training.result_refused", subject="job:1")
        assert len(refused) == 1 and "lease lost" in refused[0].details["reason"]
        assert refused[0].actor == f"worker:{worker.identity}"


REFUSE_VERSIONS = {  # a database that refuses the registration's insert (a server-side failure)
    "sqlite": [
        "CREATE TRIGGER refuse_versions BEFORE INSERT ON model_versions "
        "BEGIN SELECT RAISE(ABORT, 'model_versions refused (test)'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_versions() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'model_versions refused (test)'; END $$",
        "CREATE TRIGGER refuse_versions BEFORE INSERT ON model_versions "
        "FOR EACH ROW EXECUTE FUNCTION refuse_versions()",
    ],
}
ACCEPT_VERSIONS = {
    "sqlite": ["DROP TRIGGER refuse_versions"],
    "postgresql": ["DROP TRIGGER refuse_versions ON model_versions"],
}


def _execute(services: Services, statements: dict[str, list[str]]) -> None:
    with services.sessions() as s:
        for sql in statements[s.get_bind().dialect.name]:
            s.execute(text(sql))
        s.commit()


def test_a_registration_that_keeps_failing_fails_the_job_and_frees_the_line(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    settings = {"register_attempts": 3, "register_retry_backoff_s": 60}
    with _app(tmp_path, db_url, signing_key, **settings) as client:
        create_line(client, initial_training=True)
        services = services_of(client)
        registrar = services.jobs.registrar
        now = [datetime.now(UTC)]
        registrar.clock = lambda: now[0]
        worker = _worker(services)
        job_id = worker.run_once()
        assert job_id is not None and _job(services, job_id).status == "trained"
        _execute(services, REFUSE_VERSIONS)

        # Each failure is counted and backs off (60 s, doubled); the job stays trained meanwhile.
        for tried, wait_s in ((1, 60), (2, 120)):
            assert registrar.run_once() == job_id
            job = _job(services, job_id)
            assert (job.status, job.register_attempts) == ("trained", tried)
            assert job.not_before == now[0] + timedelta(seconds=wait_s)
            assert job.error is not None
            assert job.error.startswith(f"registration failed ({tried} of 3), will retry in")
            assert "model_versions refused (test)" in job.error
            assert registrar.run_once() is None  # backing off
            assert _job(services, job_id).register_attempts == tried
            now[0] += timedelta(seconds=wait_s)

        # The third failure fails the job, audited; the line is free to train again.
        assert registrar.run_once() == job_id
        got = client.get(f"/api/v1/training-jobs/{job_id}").json()
        assert (got["status"], got["register_attempts"]) == ("failed", 3), got
        assert got["error"].startswith("registration failed 3 time(s), gave up:")
        assert "model_versions refused (test)" in got["error"]
        with services.sessions() as s:
            entries = audit.list_entries(
                s, action="training.registration_failed", subject=f"job:{job_id}"
            )
        assert len(entries) == 1 and entries[0].actor == "registrar"
        assert entries[0].details["attempts"] == 3
        assert "model_versions refused (test)" in entries[0].details["reason"]
        assert client.get("/api/v1/model-lines/digits/versions").json() == []

        _execute(services, ACCEPT_VERSIONS)
        again = client.post("/api/v1/training-jobs", json={"model_line": "digits"})
        assert again.status_code == 201, again.text
        assert worker.run_once() == again.json()["id"]
        assert registrar.run_once() == again.json()["id"]
        got = client.get(f"/api/v1/training-jobs/{again.json()['id']}").json()
        assert (got["status"], got["register_attempts"], got["result_version"]) == (
            "succeeded",
            0,
            1,
        )


def _production_settings(tmp_path: Path, db_url: str, **kw):
    keys, trust = tmp_path / "keys", tmp_path / "trust"
    runner = CliRunner()
    assert runner.invoke(cli_app, ["keys", "init", str(keys)]).exit_code == 0
    pub = str(keys / "signing.pub.pem")
    args = ["keys", "init-root", "--out", str(trust), "--release-key-pub", pub]
    made = runner.invoke(cli_app, args)
    assert made.exit_code == 0, made.output
    return make_settings(
        tmp_path,
        db_url,
        environment="production",
        admin_token="a-real-admin-token-0123456789",
        signing_key_path=keys / "signing.pem",
        trust_dir=trust,
        **kw,
    )


@pytest.mark.parametrize("environment", ["production", "development"])
def test_a_production_server_starts_no_embedded_worker(
    tmp_path: Path, environment: str, signing_key
) -> None:
    db_url = f"sqlite:///{tmp_path}/edgeloop.db"
    if environment == "production":
        settings = _production_settings(tmp_path, db_url, enable_job_runner=True)
    else:
        priv, _ = write_key_pair(tmp_path / "keys", signing_key)
        settings = make_settings(tmp_path, db_url, signing_key_path=priv, enable_job_runner=True)
    app = create_app(settings)
    with TestClient(app):
        services: Services = app.state.services
        threads = {t.name for t in threading.enumerate()}
        assert "registrar" in threads
        if environment == "production":
            assert services.jobs.worker is None and "training-worker" not in threads
        else:
            assert services.jobs.worker is not None and "training-worker" in threads
    assert "registrar" not in {t.name for t in threading.enumerate()}  # stopped with the app
