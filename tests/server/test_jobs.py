"""The training job runner with a fake trainer subprocess (the real one lives in training/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from fastapi.testclient import TestClient

from server.main import create_app
from tests.conftest import write_key_pair
from tests.server.conftest import (
    authed_client,
    create_line,
    fake_python,
    make_settings,
    register,
    sample,
    services_of,
    wait_for,
)


def app_with_trainer(tmp_path: Path, db_url: str, signing_key, mode: str, **kw) -> TestClient:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, db_url, signing_key_path=priv, training_python=fake_python(tmp_path, mode), **kw
    )
    return authed_client(create_app(settings))


def run_job(client: TestClient) -> dict:
    services = services_of(client)
    job_id = services.jobs.run_once()
    assert job_id is not None
    return client.get(f"/api/v1/training-jobs/{job_id}").json()


def test_initial_job_makes_the_factory_release_then_a_pass_gets_a_rollout(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with app_with_trainer(tmp_path, db_url, signing_key, "pass") as client:
        create_line(client, initial_training=True)
        register(client, "cam-1")
        job = run_job(client)
        assert job["status"] == "succeeded" and job["trigger"] == "initial", job
        line = client.get("/api/v1/model-lines/digits").json()
        assert (line["champion_version"], line["current_release"]) == (1, 1)
        target = client.get("/api/v1/devices/cam-1/target").json()
        blob = client.get(target["artifact_url"].split("testserver", 1)[-1]).content
        onnx.checker.check_model(onnx.load_from_string(blob))
        assert client.get("/api/v1/rollouts").json() == []  # factory release: no rollout

        batch = [sample("cam-1", sample_id=f"s{i}", true_label=i % 10) for i in range(7)]
        assert client.post("/api/v1/samples", json={"samples": batch}).json()["accepted"] == 7
        assert (
            client.post("/api/v1/training-jobs", json={"model_line": "digits"}).status_code == 201
        )
        job = run_job(client)
        assert (
            job["status"] == "succeeded" and job["sample_count"] == 7 and job["result_version"] == 2
        )
        v2 = client.get("/api/v1/model-lines/digits/versions/2").json()
        assert v2["status"] == "candidate" and v2["parent_version"] == 1
        assert v2["dataset_version"] == f"fake-{job['id']}-7" and v2["sample_count"] == 7
        spec = json.loads(
            (services_of(client).settings.jobs_dir / str(job["id"]) / "spec.json").read_text()
        )
        assert spec["champion"]["version"] == 1 and Path(spec["champion"]["onnx_path"]).exists()
        assert spec["trainer"] == "sklearn-mlp" and spec["labels"] == [str(i) for i in range(10)]
        data = np.load(spec["samples_path"])
        assert data["X"].shape == (7, 64) and list(data["y"]) == [i % 10 for i in range(7)]
        assert set(data["device_ids"]) == {"cam-1"}
        rollouts = client.get("/api/v1/rollouts").json()
        assert [(r["state"], r["from_version"], r["to_version"]) for r in rollouts] == [
            ("pending_approval", 1, 2)
        ]


def test_gate_failure_registers_a_rejected_version(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with app_with_trainer(tmp_path, db_url, signing_key, "fail") as client:
        create_line(client, initial_training=True)
        job = run_job(client)
        assert job["status"] == "rejected" and "golden accuracy" in job["error"]
        v1 = client.get("/api/v1/model-lines/digits/versions/1").json()
        assert v1["status"] == "rejected" and "golden" in v1["reason"]
        line = client.get("/api/v1/model-lines/digits").json()
        assert line["champion_version"] is None and line["current_release"] is None
        assert client.get("/api/v1/rollouts").json() == []


def test_trainer_crash_is_retried_then_fails_with_its_stderr(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    with app_with_trainer(
        tmp_path, db_url, signing_key, "crash", training_max_attempts=2, training_retry_backoff_s=0
    ) as client:
        create_line(client, initial_training=True)
        job = run_job(client)
        assert job["status"] == "queued" and job["attempts"] == 1
        assert "will retry" in job["error"] and "out of memory" in job["error"]
        job = run_job(client)
        assert job["status"] == "failed" and job["attempts"] == 2 == job["max_attempts"]
        assert "exited with 3" in job["error"] and "out of memory" in job["error"]
        assert job["error"].startswith("attempt 2:")
        assert client.get("/api/v1/model-lines/digits/versions").json() == []
        # The line can be retrained after a crash.
        assert (
            client.post("/api/v1/training-jobs", json={"model_line": "digits"}).status_code == 201
        )


def test_an_invalid_spec_fails_at_once(tmp_path: Path, db_url: str, signing_key) -> None:
    with app_with_trainer(tmp_path, db_url, signing_key, "badspec") as client:
        create_line(client, initial_training=True)
        job = run_job(client)
        assert job["status"] == "failed" and job["attempts"] == 1
        assert "refused the spec" in job["error"] and "seed must be" in job["error"]


def test_a_sigkilled_trainer_is_retried(tmp_path: Path, db_url: str, signing_key) -> None:
    with app_with_trainer(
        tmp_path, db_url, signing_key, "killonce", training_retry_backoff_s=0
    ) as client:
        create_line(client, initial_training=True)
        job = run_job(client)
        assert job["status"] == "queued" and "killed by signal 9" in job["error"]
        job = run_job(client)
        assert job["status"] == "succeeded" and job["attempts"] == 2
        assert client.get("/api/v1/model-lines/digits").json()["champion_version"] == 1


def test_retry_waits_for_its_backoff(tmp_path: Path, db_url: str, signing_key) -> None:
    with app_with_trainer(
        tmp_path, db_url, signing_key, "crash", training_retry_backoff_s=3600
    ) as client:
        create_line(client, initial_training=True)
        assert run_job(client)["status"] == "queued"
        assert services_of(client).jobs.run_once() is None  # not due for an hour


def test_runner_thread_picks_up_a_threshold_job(tmp_path: Path, db_url: str, signing_key) -> None:
    with app_with_trainer(
        tmp_path, db_url, signing_key, "pass", enable_job_runner=True, job_poll_s=0.2
    ) as client:
        create_line(client, initial_training=True, retrain_threshold=5)
        register(client, "cam-1")
        wait_for(
            lambda: client.get("/api/v1/model-lines/digits").json()["current_release"],
            timeout=60,
            what="factory release",
        )
        batch = [sample("cam-1", sample_id=f"t{i}") for i in range(5)]
        assert client.post("/api/v1/samples", json={"samples": batch}).json()["accepted"] == 5
        jobs = wait_for(
            lambda: [
                j
                for j in client.get("/api/v1/training-jobs").json()
                if j["trigger"] == "threshold" and j["status"] == "succeeded"
            ],
            timeout=60,
            what="threshold job done",
        )
        assert len(jobs) == 1 and jobs[0]["result_version"] == 2
