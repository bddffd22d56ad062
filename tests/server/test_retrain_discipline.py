"""Retraining discipline: one rollout of a candidate does not start another training while the
samples it receives come from devices on older versions; devices on the candidate do; the
per-line cooldown delays a threshold job; the trainer runs at a lower CPU priority.

Real app, real database (SQLite and PostgreSQL), the real job runner with a fake trainer
subprocess (the real trainer is covered in tests/training)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from server.db.registry import TrainingJob
from server.db.sample_store import Sample
from tests.conftest import run_python
from tests.server.conftest import create_line, register, sample, services_of
from tests.server.test_jobs import app_with_trainer, run_job

THRESHOLD = 10


def upload(client: TestClient, device: str, prefix: str, n: int, *, version: int) -> dict:
    batch = []
    for i in range(n):
        rec = sample(device, sample_id=f"{prefix}-{i}", true_label=i % 10)
        rec["model_version"] = version
        batch.append(rec)
    resp = client.post("/api/v1/samples", json={"samples": batch})
    assert resp.status_code == 200, resp.text
    return resp.json()


def jobs(client: TestClient) -> list[tuple[str, str]]:
    with services_of(client).sessions() as session:
        return [
            (j.trigger, j.status)
            for j in session.scalars(select(TrainingJob).order_by(TrainingJob.id))
        ]


def line(client: TestClient) -> dict:
    return client.get("/api/v1/model-lines/digits").json()


def test_a_rollout_starts_no_training_until_devices_on_the_candidate_cross_the_threshold(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with app_with_trainer(tmp_path, db_url, signing_key, "pass") as client:
        create_line(client, initial_training=True, retrain_threshold=THRESHOLD)
        for d in ("old-1", "old-2", "canary-1"):
            register(client, d)
        assert run_job(client)["result_version"] == 1  # the factory model, v1

        # Drift: devices on v1 cross the threshold once -> one training -> candidate v2,
        # whose automatic rollout waits for approval.
        upload(client, "old-1", "a", THRESHOLD, version=1)
        assert jobs(client) == [("initial", "succeeded"), ("threshold", "queued")]
        assert run_job(client)["result_version"] == 2
        rollouts = client.get("/api/v1/rollouts").json()
        assert [(r["state"], r["to_version"]) for r in rollouts] == [("pending_approval", 2)]
        assert line(client)["new_samples"] == 0  # the count restarted with the rollout

        # Devices still on v1 keep uploading what v1 gets wrong: three thresholds' worth.
        # Stored (they go into the next dataset), but no training.
        for k in range(3):
            out = upload(client, "old-2", f"b{k}", THRESHOLD, version=1)
            assert out["accepted"] == THRESHOLD, out
        assert line(client)["new_samples"] == 0
        with services_of(client).sessions() as session:
            stored = session.scalars(select(Sample.sample_id).where(Sample.model_version == 1))
            assert len(list(stored)) == 4 * THRESHOLD
        assert jobs(client) == [("initial", "succeeded"), ("threshold", "succeeded")]

        # Devices on the candidate (the canary) cross the threshold: evidence against v2.
        upload(client, "canary-1", "c", THRESHOLD - 1, version=2)
        assert line(client)["new_samples"] == THRESHOLD - 1 and len(jobs(client)) == 2
        upload(client, "canary-1", "d", 1, version=2)
        assert jobs(client)[2:] == [("threshold", "queued")]


def test_samples_of_the_champion_count_again_after_the_rollout_ends(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    """Aborting the rollout of v2 puts the floor back at the champion: v1's mistakes are
    evidence again (an abandoned candidate must not silence the fleet)."""
    with app_with_trainer(tmp_path, db_url, signing_key, "pass") as client:
        create_line(client, initial_training=True, retrain_threshold=THRESHOLD)
        register(client, "old-1")
        run_job(client)
        upload(client, "old-1", "a", THRESHOLD, version=1)
        run_job(client)
        rollout = client.get("/api/v1/rollouts").json()[0]
        upload(client, "old-1", "b", THRESHOLD, version=1)
        assert len(jobs(client)) == 2
        resp = client.post(f"/api/v1/rollouts/{rollout['id']}/abort", json={"reason": "test"})
        assert resp.status_code == 200, resp.text
        upload(client, "old-1", "c", THRESHOLD, version=1)
        assert jobs(client)[2:] == [("threshold", "queued")]


def test_cooldown_delays_the_threshold_job_until_it_ends(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with app_with_trainer(tmp_path, db_url, signing_key, "pass") as client:
        create_line(
            client,
            initial_training=True,
            retrain_threshold=THRESHOLD,
            trainer=None,
            config={"trainer": "sklearn-mlp", "cooldown_s": 3600},
        )
        register(client, "cam-1")
        run_job(client)
        services = services_of(client)
        with services.sessions() as session:
            finished = session.scalars(select(TrainingJob.finished_at)).one()
        upload(client, "cam-1", "a", THRESHOLD, version=1)
        with services.sessions() as session:
            job = session.scalars(
                select(TrainingJob).where(TrainingJob.trigger == "threshold")
            ).one()
            assert job.status == "queued"
            assert job.not_before == finished + timedelta(seconds=3600)
        assert services.jobs.run_once() is None  # not claimed during the cooldown


def test_the_job_runner_asks_the_trainer_for_the_configured_niceness(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with app_with_trainer(tmp_path, db_url, signing_key, "pass", training_nice=7) as client:
        create_line(client, initial_training=True)
        job = run_job(client)
        spec_dir = services_of(client).settings.jobs_dir / str(job["id"])
        env = json.loads((spec_dir / "attempt-1" / "env.json").read_text())
        assert env == {"EDGELOOP_TRAINER_NICE": "7"}


def test_the_trainer_lowers_its_own_priority_before_it_starts_threads() -> None:
    """``python -m training`` applies EDGELOOP_TRAINER_NICE first thing (here: a spec that
    does not exist, so it stops right after; the niceness is read back from /proc)."""
    done = run_python(
        "import os, sys, training.__main__ as m\n"
        "os.environ['EDGELOOP_TRAINER_NICE'] = str(os.nice(0) + 5)\n"
        "before = os.nice(0)\n"
        "m._lower_priority()\n"
        "print(before, os.nice(0))\n"
    )
    before, after = map(int, done.stdout.split())
    assert after == min(19, before + 5)
