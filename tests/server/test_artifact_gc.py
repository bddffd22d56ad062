"""``edgeloop artifacts gc``: unreferenced objects listed (dry run), deleted with --apply.

A real training flow fills the local store: job 1 trained by a worker and registered (its model
and the line's base pool are referenced; its report.json is not, once registered), job 2 trained
and not yet registered (every result of an unfinished job is referenced), plus an orphan object
and a fresh one. Ages are set on the files (the local backend's stored_at is the file's mtime).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from typer.testing import CliRunner

from server.cli.main import app as cli_app
from server.db import audit
from server.db.job_queue import get_job
from server.main import create_app
from server.release.artifacts import LocalArtifactStore
from server.retrain.worker import TrainingWorker
from tests.conftest import write_key_pair
from tests.server.conftest import (
    authed_client,
    create_line,
    fake_python,
    make_settings,
    services_of,
)

DAY_S = 24 * 3600


def _gc(env: dict[str, str], *args: str) -> dict:
    got = CliRunner().invoke(cli_app, ["--json", "artifacts", "gc", *args], env=env)
    assert got.exit_code == 0, got.output
    out: dict = json.loads(got.output)
    return out


def test_gc_lists_then_deletes_only_what_nothing_refers_to(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        training_python=fake_python(tmp_path, "pass"),
        embedded_worker=False,
    )
    with authed_client(create_app(settings)) as client:
        services = services_of(client)
        store = services.store
        assert isinstance(store, LocalArtifactStore)
        create_line(client, initial_training=True)
        worker = TrainingWorker(settings=settings, sessions=services.sessions, store=store)
        job1 = client.get(f"/api/v1/training-jobs/{worker.run_once()}").json()
        assert services.jobs.run_once() == job1["id"]
        job1 = client.get(f"/api/v1/training-jobs/{job1['id']}").json()
        assert job1["status"] == "succeeded"
        with services.sessions() as s:
            first = get_job(s, job_id=job1["id"])
            report1, model1, base = (
                first.result_report_sha256,
                first.result_sha256,
                first.result_base_sha256,
            )
        assert client.post("/api/v1/training-jobs", json={"model_line": "digits"}).is_success
        job2_id = worker.run_once()
        with services.sessions() as s:
            second = get_job(s, job_id=job2_id)
            assert second.status == "trained"
            live = {second.result_sha256, second.result_report_sha256, second.result_base_sha256}
        orphan, _ = store.put_bytes(b"bytes nothing refers to")
        old = time.time() - 10 * DAY_S
        for path in store.root.iterdir():
            os.utime(path, (old, old))
        fresh, _ = store.put_bytes(b"bytes stored a moment ago")

        env = {
            "EDGELOOP_DATABASE_URL": db_url,
            "EDGELOOP_DATA_DIR": str(settings.data_dir),
            "EDGELOOP_ARTIFACT_STORE_URL": "",
        }
        dry = _gc(env, "--older-than", "7")
        garbage = {o["sha256"] for o in dry["garbage"]}
        assert report1 not in live  # each job's report.json is its own
        assert garbage == {report1, orphan}, dry
        assert not dry["applied"] and dry["kept_young"] == 1
        assert all(store.exists(sha) for sha in garbage)  # a dry run deletes nothing
        assert _gc(env, "--older-than", "11")["garbage"] == []  # none is that old

        applied = _gc(env, "--older-than", "7", "--apply")
        assert {o["sha256"] for o in applied["garbage"]} == garbage and applied["applied"]
        assert not any(store.exists(sha) for sha in garbage)
        for sha in {model1, base, fresh, *live} - {None}:
            assert store.exists(sha), sha
        with services.sessions() as s:
            (entry,) = audit.list_entries(s, action="artifacts.gc")
        assert entry.actor == "cli" and entry.subject == store.url
        assert sorted(entry.details["sha256"]) == sorted(garbage)
        assert _gc(env, "--older-than", "7")["garbage"] == []
        # What the store still serves: the registered version's model.
        assert client.get(f"/api/v1/artifacts/{model1}").status_code == 200
