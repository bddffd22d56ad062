"""The real trainer behind the server: registry, aliases, gate reports, lineage, reproducibility.

Each job runs ``python -m training`` in a subprocess exactly as in production (sklearn-mlp on the
digits line, a few seconds each).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.main import create_app
from tests.conftest import write_key_pair
from tests.server.conftest import authed_client, make_settings, register, sample, services_of
from training.data import digits_pools, drift

CONFIG = {
    "trainer": "sklearn-mlp",
    "hyperparams": {"max_iter": 300},
    "seed": 5,
    "warm_start": True,
    "field_fraction": 0.2,
    "gate": {"max_golden_drop": 0.03, "min_field_gain": 0.0, "min_class_count": 20},
}
DIGITS_SPEC = {"name": "input", "shape": [-1, 64], "dtype": "float32", "min": 0.0, "max": 1.0}


@pytest.fixture
def real(tmp_path: Path, db_url: str, signing_key) -> Iterator[TestClient]:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, db_url, signing_key_path=priv, training_python=sys.executable
    )
    with authed_client(create_app(settings)) as client:
        yield client


def _train(client: TestClient) -> dict:
    job_id = services_of(client).jobs.run_once()
    assert job_id is not None
    job = client.get(f"/api/v1/training-jobs/{job_id}").json()
    assert job["status"] in ("succeeded", "rejected"), job
    return job


def _upload(client: TestClient, X: np.ndarray, y: np.ndarray, prefix: str) -> list[str]:
    """Upload as three devices; returns the ids label screening quarantined."""
    batch = [
        sample(f"cam-{i % 3}", sample_id=f"{prefix}{i}", x=X[i], true_label=int(y[i]))
        for i in range(len(y))
    ]
    accepted, held = 0, []
    for device in sorted({r["device_id"] for r in batch}):  # each device uploads its own
        mine = [r for r in batch if r["device_id"] == device]
        out = client.post("/api/v1/samples", json={"samples": mine}).json()
        accepted += out["accepted"]
        held += [q["sample_id"] for q in out.get("quarantined", [])]
    assert accepted == len(y), out
    return held


def test_registry_lineage_gate_and_reproducibility(real: TestClient) -> None:
    client = real
    body = {
        "name": "digits",
        "config": CONFIG,
        "input_spec": DIGITS_SPEC,
        "labels": [str(i) for i in range(10)],
        "retrain_threshold": 10_000,
    }
    line = client.post("/api/v1/model-lines", json=body)
    assert line.status_code == 201, line.text
    assert line.json()["training_config"]["seed"] == 5
    assert line.json()["training_config"]["gate"]["max_class_recall_drop"] == 0.15
    for i in range(3):
        register(client, f"cam-{i}")

    # v1: the initial model, signed as the factory release.
    assert _train(client)["status"] == "succeeded"
    v1 = client.get("/api/v1/model-lines/digits/aliases/champion").json()
    assert v1["version"] == 1 and v1["alias"] == "champion" and v1["weights_sha256"]

    # v2: drifted field samples from three devices; warm start from v1.
    field = digits_pools().field
    drifted = drift(field.X[:150], severity=1.0, seed=3)
    _upload(client, drifted, field.y[:150], "d")
    assert client.post("/api/v1/training-jobs", json={"model_line": "digits"}).status_code == 201
    job2 = _train(client)
    assert job2["status"] == "succeeded" and job2["result_version"] == 2
    report = client.get("/api/v1/model-lines/digits/versions/2/report").json()
    assert report["passed"] and report["warm_start"] == {
        "requested": True,
        "used": True,
        "from_version": 1,
    }
    assert {c["check"] for c in report["gate"]["checks"]} >= {"accuracy", "golden ECE"}
    challenger = report["metrics"]["challenger"]
    assert 0.5 < challenger["golden_roc_auc"] <= 1.0 and 0.0 <= challenger["golden_ece"] < 1.0
    assert len(challenger["golden_per_class"]) == 10
    aliases = client.get("/api/v1/model-lines/digits/aliases").json()
    assert aliases == {"champion": 1, "candidate": 2, "latest": 2}
    arts = client.get("/api/v1/model-lines/digits/versions/2/artifacts").json()
    assert arts["opset"] == 17 and arts["model_url"].endswith(arts["model_sha256"])
    assert client.get(arts["model_url"].split("127.0.0.1:8000", 1)[1]).status_code == 200

    # Lineage: model -> dataset -> samples -> devices, and back.
    lin = client.get("/api/v1/model-lines/digits/versions/2/lineage?sample_limit=5").json()
    ds = lin["dataset"]
    assert ds["version"] == job2["dataset_version"] == lin["model"]["dataset_version"]
    assert lin["sample_counts"]["train"] + lin["sample_counts"]["field"] == 150
    assert {d["device_id"]: d["samples"] for d in lin["devices"]} == {
        "cam-0": 50,
        "cam-1": 50,
        "cam-2": 50,
    }
    assert len(lin["samples"]) == 5 and ds["base"] == "digits-train"
    back = client.get("/api/v1/samples/d7/lineage").json()
    assert back["sample"]["device_id"] == "cam-1"
    assert [d["version"] for d in back["datasets"]] == [ds["version"]]
    assert [(m["line"], m["version"]) for m in back["models"]] == [("digits", 2)]
    dev = client.get("/api/v1/devices/cam-2/lineage").json()
    assert dev["samples"] == 50 and dev["datasets"] == [{"version": ds["version"], "samples": 50}]
    full = client.get(f"/api/v1/datasets/{ds['version']}?sample_limit=200").json()
    assert len(full["samples"]) == 150 and [m["version"] for m in full["models"]] == [2]

    # v3: a deliberately worse challenger (flipped labels) is rejected, the reason stored.
    # Label screening is the first line of defence: it holds nearly all of them...
    flipped = (field.y[150:450] + 1) % 10
    held = _upload(client, field.X[150:450], flipped, "f")
    assert len(held) >= 0.9 * len(flipped), len(held)
    # ...and the gate is the second: an operator who releases them all gets a rejected model.
    for sample_id in held:
        assert client.post(f"/api/v1/samples/{sample_id}/release").status_code == 200
    client.post("/api/v1/training-jobs", json={"model_line": "digits"})
    job3 = _train(client)
    assert job3["status"] == "rejected" and "golden accuracy" in job3["error"]
    v3 = client.get("/api/v1/model-lines/digits/versions/3").json()
    assert v3["status"] == "rejected" and v3["reason"].startswith("rejected: ")
    assert v3["report"]["gate"]["passed"] is False
    assert client.get("/api/v1/model-lines/digits/aliases/candidate").json()["version"] == 2

    # Same dataset version + config + seed: the same metrics, and the record says so.
    client.post("/api/v1/training-jobs", json={"model_line": "digits"})
    job4 = _train(client)
    v4 = client.get("/api/v1/model-lines/digits/versions/4").json()
    assert job4["dataset_version"] == job3["dataset_version"]
    assert v4["report"]["reproducibility"] == v3["report"]["reproducibility"]
    assert v4["metrics"] == v3["metrics"]  # the bytes differ only by job_id in the metadata


def test_config_endpoints_and_the_config_file(real: TestClient, tmp_path: Path) -> None:
    client = real
    settings = services_of(client).settings
    settings.line_configs_dir.mkdir(parents=True, exist_ok=True)
    (settings.line_configs_dir / "cnn.toml").write_text(
        'trainer = "torch-cnn"\nseed = 3\nschedule_s = 3600\nretrain_threshold = 77\n'
        "[hyperparams]\nepochs = 2\n[gate]\nmax_ece_increase = 0.1\n"
    )
    body = {
        "name": "cnn",
        "config_path": "cnn.toml",
        "input_spec": DIGITS_SPEC,
        "labels": [str(i) for i in range(10)],
        "initial_training": False,
    }
    line = client.post("/api/v1/model-lines", json=body).json()
    assert line["trainer"] == "torch-cnn" and line["hyperparams"] == {"epochs": 2}
    assert line["schedule_s"] == 3600 and line["retrain_threshold"] == 77
    assert line["training_config"]["gate"]["max_ece_increase"] == 0.1
    put = client.put(
        "/api/v1/model-lines/cnn/config", json={"config": {"trainer": "sklearn-logreg"}}
    )
    assert put.status_code == 200 and put.json()["trainer"] == "sklearn-logreg"
    assert put.json()["schedule_s"] is None


def test_the_schedule_trigger_needs_new_samples(real: TestClient) -> None:
    from datetime import timedelta

    from server.db.base import utcnow
    from server.db.registry import TrainingJob
    from server.retrain.scheduler import enqueue_due

    client = real
    body = {
        "name": "digits",
        "config": {"schedule_s": 60},
        "input_spec": DIGITS_SPEC,
        "labels": [str(i) for i in range(10)],
        "initial_training": False,
    }
    assert client.post("/api/v1/model-lines", json=body).status_code == 201
    register(client, "cam-0")
    services = services_of(client)
    later = utcnow() + timedelta(seconds=61)
    with services.sessions() as s:
        assert enqueue_due(s, now=later) == []  # nothing new since the line was created
    _upload(client, np.full((1, 64), 0.25, np.float32), np.array([1]), "n")
    with services.sessions() as s:
        assert enqueue_due(s, now=utcnow()) == []  # not yet 60 s
        (job_id,) = enqueue_due(s, now=later)
        assert enqueue_due(s, now=later) == []  # one job at a time
        job = s.get(TrainingJob, job_id)
        assert job is not None and job.trigger == "schedule"
