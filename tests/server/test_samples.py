"""Sample upload: every validation rule, idempotent duplicates, one job per threshold."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from server.db.registry import TrainingJob
from server.db.sample_store import Sample
from tests.server.conftest import create_line, register, sample, services_of


@pytest.fixture
def seeded(client: TestClient) -> TestClient:
    create_line(client)
    create_line(client, name="other")
    register(client, "cam-1")
    register(client, "cam-other", line="other")
    return client


def upload(client: TestClient, samples: list) -> dict:
    resp = client.post("/api/v1/samples", json={"samples": samples})
    assert resp.status_code == 200, resp.text
    return resp.json()


NAN_INPUT = np.full(64, 0.5, dtype=np.float32)
NAN_INPUT[3] = np.nan
BIG_INPUT = np.full(64, 0.5, dtype=np.float32)
BIG_INPUT[0] = 1.5

# A record for another device (unknown or not) refuses the whole batch with 403 before these
# per-record rules run: tests/server/test_auth.py covers it.
BAD_SAMPLES = [
    ("registered to model line 'digits'", {"model_line": "other"}),
    ("unknown model line", {"model_line": "nope"}),
    ("holds 10 float32 values", {"input_b64": base64.b64encode(b"\0" * 40).decode()}),
    ("not valid base64", {"input_b64": "***"}),
    ("NaN or infinite", {"x": NAN_INPUT}),
    ("must lie in [0, 1]", {"x": BIG_INPUT}),
    ("true_label 10 is not in range", {"true_label": 10}),
    ("predicted_label -1 is not in range", {"predicted_label": -1}),
    ("confidence 1.5 is not in [0, 1]", {"confidence": 1.5}),
    ("confidence", {"confidence": "high"}),
    ("sample_id must be 1-64", {"sample_id": "x" * 65}),
    ("sample_id must be 1-64", {"sample_id": ""}),
    # A null true_label is an input captured without a label (tests/server/test_labelling.py).
    ("field 'true_label' has the wrong type", {"true_label": "3"}),
    ("must be a JSON object", None),
]


@pytest.mark.parametrize(("reason", "change"), BAD_SAMPLES, ids=[r for r, _ in BAD_SAMPLES])
def test_each_rule_rejects_with_its_reason(seeded: TestClient, reason: str, change) -> None:
    if change is None:
        rec: object = ["not", "an", "object"]
    else:
        change = dict(change)
        x = change.pop("x", None)
        rec = sample("cam-1", sample_id="s-bad", x=x)
        rec.update(change)  # type: ignore[union-attr]
        if (
            isinstance(rec, dict)
            and rec.get("device_id") == "cam-other"
            and "model_line" not in change
        ):
            rec["model_line"] = "digits"
    good = sample("cam-1", sample_id="s-good")
    out = upload(seeded, [rec, good])
    assert out["accepted"] == 1 and out["duplicates"] == 0
    assert len(out["rejected"]) == 1
    assert reason in out["rejected"][0]["reason"], out["rejected"][0]


def test_duplicates_are_counted_and_stored_once(seeded: TestClient) -> None:
    batch = [sample("cam-1", sample_id=f"s{i}") for i in range(5)]
    assert upload(seeded, batch) == {"accepted": 5, "duplicates": 0, "rejected": []}
    again = upload(seeded, batch + [sample("cam-1", sample_id="s5"), batch[0]])
    assert again == {"accepted": 1, "duplicates": 6, "rejected": []}
    services = services_of(seeded)
    with services.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Sample)) == 6
        row = s.get(Sample, "s0")
        assert row is not None
        assert np.frombuffer(row.input, dtype="<f4").shape == (64,)
    line = seeded.get("/api/v1/model-lines/digits").json()
    assert line["new_samples"] == 6  # retries do not double count


def test_threshold_triggers_exactly_one_job(client: TestClient) -> None:
    create_line(client, retrain_threshold=10)
    for i in range(4):
        register(client, f"cam-{i}")
    results: list[dict] = []

    def worker(k: int) -> None:
        for b in range(3):
            batch = [sample(f"cam-{k}", sample_id=f"k{k}-b{b}-{i}") for i in range(4)]
            results.append(upload(client, batch))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["accepted"] for r in results) == 48
    services = services_of(client)
    with services.sessions() as s:
        jobs = s.scalars(select(TrainingJob)).all()
    assert [(j.trigger, j.status) for j in jobs] == [("threshold", "queued")]
    line = client.get("/api/v1/model-lines/digits").json()
    # Counted since the trigger: what came after the job was queued (no second job while queued).
    assert 0 <= line["new_samples"] < 48


def test_batch_limits(seeded: TestClient) -> None:
    services = services_of(seeded)
    limit = services.settings.max_samples_per_batch
    too_many = [sample("cam-1", sample_id=f"m{i}") for i in range(limit + 1)]
    assert seeded.post("/api/v1/samples", json={"samples": too_many}).status_code == 413
    assert seeded.post("/api/v1/samples", json={"samples": []}).status_code == 422
    huge = b'{"samples": [' + b" " * (services.settings.max_request_bytes + 10) + b"]}"
    resp = seeded.post(
        "/api/v1/samples", content=huge, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413


def test_same_content_under_another_id_is_refused_with_the_other_id(seeded: TestClient) -> None:
    x = np.linspace(0, 1, 64, dtype=np.float32)
    assert upload(seeded, [sample("cam-1", sample_id="orig", x=x)])["accepted"] == 1
    out = upload(
        seeded,
        [
            sample("cam-1", sample_id="copy", x=x),
            sample("cam-1", sample_id="relabelled", x=x, true_label=7),
            sample("cam-1", sample_id="orig", x=x),  # the same id again: a duplicate (retry)
        ],
    )
    assert out["accepted"] == 0 and out["duplicates"] == 1
    reasons = {r["sample_id"]: r["reason"] for r in out["rejected"]}
    assert reasons["copy"].startswith("duplicate content: same input as sample 'orig'")
    assert "conflicting label: same input as sample 'orig', labelled 3" in reasons["relabelled"]
    # Within one batch too, and another line may hold the same input.
    y = np.linspace(1, 0, 64, dtype=np.float32)
    out = upload(
        seeded, [sample("cam-1", sample_id="a1", x=y), sample("cam-1", sample_id="a2", x=y)]
    )
    assert out["accepted"] == 1 and "same input as sample 'a1'" in out["rejected"][0]["reason"]
    other = sample("cam-other", sample_id="o1", x=y, line="other")
    assert upload(seeded, [other])["accepted"] == 1


def test_rules_come_from_the_signed_release_manifest(seeded: TestClient) -> None:
    from server.db.registry import ModelLine
    from tests.server.conftest import add_version

    services = services_of(seeded)
    add_version(services, version=1, status="champion", champion_release=True)
    # The registered spec drifts from what was signed: the signed manifest still rules.
    with services.sessions() as s:
        line = s.get(ModelLine, "digits")
        assert line is not None
        line.input_spec = {**line.input_spec, "max": 100.0}
        line.labels = [*line.labels, "extra"]
        s.commit()
    big = np.full(64, 0.5, dtype=np.float32)
    big[0] = 50.0
    out = upload(
        seeded,
        [sample("cam-1", sample_id="big", x=big), sample("cam-1", sample_id="l10", true_label=10)],
    )
    reasons = {r["sample_id"]: r["reason"] for r in out["rejected"]}
    assert "must lie in [0, 1]" in reasons["big"] and "signed release 1 manifest" in reasons["big"]
    assert "true_label 10 is not in range(0, 10)" in reasons["l10"]


def test_integer_dtypes_need_whole_numbers(client: TestClient) -> None:
    spec = {"name": "input", "shape": [-1, 4], "dtype": "uint8", "min": 0, "max": 255}
    create_line(client, name="bytes", input_spec=spec, labels=["a", "b"])
    register(client, "cam-b", line="bytes")
    ok = sample(
        "cam-b",
        sample_id="b1",
        line="bytes",
        x=np.array([0, 1, 2, 255], np.float32),
        true_label=1,
        predicted_label=0,
    )
    frac = sample(
        "cam-b",
        sample_id="b2",
        line="bytes",
        x=np.array([0, 1.5, 2, 3], np.float32),
        true_label=1,
        predicted_label=0,
    )
    out = upload(client, [ok, frac])
    assert out["accepted"] == 1
    assert "whole numbers for dtype uint8" in out["rejected"][0]["reason"]
