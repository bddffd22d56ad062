"""A worker's hand-back wakes every server's registrar (PostgreSQL LISTEN/NOTIFY), poll as fallback.

The registrar polls every ``registrar_poll_s``; here that is an hour, so a job registered within
the test was registered because something woke the registrar, and the registrar records which
notification did (``Registrar.notified``). Nothing here asserts on elapsed time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from firmware_sim.services import WorkerProcess
from server.main import create_app
from server.retrain.registrar import Registrar
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

HOUR_S = 3600.0


def _app(tmp_path: Path, db_url: str, signing_key, *, poll_s: float) -> TestClient:
    """A server whose registrar thread runs (no embedded worker), polling every ``poll_s``."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        training_python=fake_python(tmp_path, "pass"),
        embedded_worker=False,
        enable_job_runner=True,
        registrar_poll_s=poll_s,
    )
    return authed_client(create_app(settings))


def _status(client: TestClient, job_id: int) -> str:
    status: str = client.get(f"/api/v1/training-jobs/{job_id}").json()["status"]
    return status


def _initial_job(client: TestClient) -> int:
    """Create the line with its initial training job; returns the job's id."""
    create_line(client, initial_training=True)
    (job,) = client.get("/api/v1/training-jobs").json()
    job_id: int = job["id"]
    return job_id


def _listening(registrar: Registrar, connects: int = 1) -> None:
    listener = registrar.listener
    assert listener is not None
    wait_for(lambda: listener.connects >= connects, what=f"listener connection {connects}")


def _worker_process(tmp_path: Path, db_url: str, services: Services) -> WorkerProcess:
    return WorkerProcess(
        tmp_path / "worker",
        database_url=db_url,
        artifact_store_url=services.store.url,
        env={
            "EDGELOOP_TRAINING_PYTHON": fake_python(tmp_path, "pass"),
            "EDGELOOP_JOB_POLL_S": "0.2",
        },
    )


def test_a_worker_process_hand_back_wakes_the_registrar_of_another_process(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    postgres = db_url.startswith("postgresql")
    # On SQLite nothing notifies: the poll (0.2 s here) is how the registrar finds the job.
    with _app(tmp_path, db_url, signing_key, poll_s=HOUR_S if postgres else 0.2) as client:
        services = services_of(client)
        registrar = services.jobs.registrar
        if postgres:
            _listening(registrar)
        else:
            assert registrar.listener is None
        job_id = _initial_job(client)
        worker = _worker_process(tmp_path, db_url, services).start()
        pid = worker.pid
        try:
            wait_for(
                lambda: _status(client, job_id) in ("succeeded", "failed"),
                timeout=120,
                what="the job trained by the worker process and registered",
            )
        finally:
            worker.stop()
        got = client.get(f"/api/v1/training-jobs/{job_id}").json()
        assert got["status"] == "succeeded", got
        assert f":{pid}:" in got["claimed_by"]  # trained in the other process
        assert list(registrar.notified) == ([job_id] if postgres else [])


@pytest.mark.postgres
def test_the_registrar_listens_again_after_its_connection_is_dropped(
    tmp_path: Path, pg_url: str, signing_key
) -> None:
    with _app(tmp_path, pg_url, signing_key, poll_s=HOUR_S) as client:
        services = services_of(client)
        registrar = services.jobs.registrar
        _listening(registrar)
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                dropped = conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'registrar-listener' "
                        "AND datname = current_database()"
                    )
                ).all()
        finally:
            admin.dispose()
        assert dropped == [(True,)]
        _listening(registrar, connects=2)

        job_id = _initial_job(client)
        worker = TrainingWorker(
            settings=services.settings, sessions=services.sessions, store=services.store
        )
        assert worker.run_once() == job_id
        wait_for(lambda: _status(client, job_id) == "succeeded", what="the job registered")
        assert list(registrar.notified) == [job_id]
        assert registrar._worker.running  # the registrar thread outlived the dropped connection
