"""The labelling queue: unlabelled samples are stored and queued but count toward nothing; the
queue goes out as Label Studio tasks and comes back as Label Studio's JSON export; devices fill
labels too; every label records where it came from, down to the dataset manifest (SQLite and
PostgreSQL, real HTTP app)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from server.cli.main import app as cli_app
from server.db import job_queue
from server.db.audit import AuditRecord
from server.db.base import utcnow
from server.db.registry import TrainingJob
from server.db.sample_store import Sample
from server.intake.label_studio import LabelFileError, parse_label_studio
from server.main import create_app
from tests.authkit import FleetAuth
from tests.conftest import TEST_ADMIN_TOKEN, write_key_pair
from tests.server.conftest import create_line, make_settings, register, sample, services_of
from tests.server.live_server import LiveServer
from tests.server.test_poisoning import install_champion
from training.data import digits_pools
from training.dataset import build_dataset
from training.samples import load_samples


def upload(client: TestClient, samples: list[dict[str, Any]]) -> dict[str, Any]:
    resp = client.post("/api/v1/samples", json={"samples": samples})
    assert resp.status_code == 200, resp.text
    return resp.json()


def unlabelled(device_id: str, sample_id: str, true_label: int = 3) -> dict[str, Any]:
    """A sample as a device captures it under a capture policy (its digit is ``true_label``)."""
    return {**sample(device_id, sample_id=sample_id, true_label=true_label), "true_label": None}


def jobs(client: TestClient) -> list[tuple[str, str]]:
    with services_of(client).sessions() as s:
        return [(j.trigger, j.status) for j in s.scalars(select(TrainingJob))]


def annotated(tasks: list[dict[str, Any]], choices: dict[str, str]) -> list[dict[str, Any]]:
    """What Label Studio's JSON export of ``tasks`` looks like once labelled: its own task ids,
    our data back, the annotations (a cancelled one first, ignored)."""
    out = []
    for i, task in enumerate(tasks):
        sid = task["data"]["sample_id"]
        anns = []
        if sid in choices:
            anns = [
                {"id": 900 + i, "was_cancelled": True, "result": []},
                {
                    "id": 1000 + i,
                    "completed_by": 1,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "result": [
                        {
                            "id": f"r{i}",
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "origin": "manual",
                            "value": {"choices": [choices[sid]]},
                        }
                    ],
                },
            ]
        out.append(
            {
                "id": 500 + i,
                "project": 7,
                "data": task["data"],
                "annotations": anns,
                "predictions": [],
            }
        )
    return out


@pytest.fixture
def line(client: TestClient) -> TestClient:
    create_line(client, retrain_threshold=3)
    register(client, "cam-1")
    register(client, "cam-2")
    return client


def test_unlabelled_samples_wait_in_the_queue_and_trigger_nothing(line: TestClient) -> None:
    r = upload(line, [unlabelled("cam-1", f"u-{i}") for i in range(5)])
    assert r["accepted"] == 5 and not r["rejected"]
    assert jobs(line) == []  # five stored, threshold 3: unlabelled evidence counts for nothing
    assert line.get("/api/v1/model-lines/digits").json()["new_samples"] == 0
    queue = line.get("/api/v1/model-lines/digits/labelling-queue").json()
    assert queue["queued"] == 5
    assert [s["sample_id"] for s in queue["samples"]] == [f"u-{i}" for i in range(5)]


def test_device_ground_truth_fills_the_label_and_then_it_counts(line: TestClient) -> None:
    upload(line, [unlabelled("cam-1", f"u-{i}", true_label=7) for i in range(3)])
    assert jobs(line) == []
    # The device learns the ground truth later: the same sample ids again, with their label.
    r = upload(line, [sample("cam-1", sample_id=f"u-{i}", true_label=7) for i in range(3)])
    assert r["accepted"] == 0 and not r["rejected"]
    assert jobs(line) == [("threshold", "queued")]
    with services_of(line).sessions() as s:
        rows = s.scalars(select(Sample).order_by(Sample.sample_id)).all()
    assert [(x.true_label, x.origin, x.label_source) for x in rows] == [
        (7, "device_capture", "device")
    ] * 3
    assert line.get("/api/v1/model-lines/digits/labelling-queue").json()["queued"] == 0
    lineage = line.get("/api/v1/samples/u-0/lineage").json()["sample"]
    assert lineage["provenance"] == "device_capture+device"
    # Sent again (a retry): a duplicate, nothing changes.
    again = upload(line, [sample("cam-1", sample_id="u-0", true_label=7)])
    assert again["duplicates"] == 1 and again["accepted"] == 0


def test_a_label_for_another_input_under_the_same_id_is_refused(line: TestClient) -> None:
    upload(line, [unlabelled("cam-1", "u-0", true_label=2)])
    other = sample("cam-1", sample_id="u-other", true_label=2)  # another input, same id below
    r = upload(line, [{**other, "sample_id": "u-0"}])
    assert [x["sample_id"] for x in r["rejected"]] == ["u-0"]
    assert "another input" in r["rejected"][0]["reason"]
    assert line.get("/api/v1/model-lines/digits/labelling-queue").json()["queued"] == 1


def test_captured_and_labelled_in_one_batch_is_one_labelled_sample(line: TestClient) -> None:
    r = upload(
        line,
        [unlabelled("cam-1", "u-0", true_label=4), sample("cam-1", sample_id="u-0", true_label=4)],
    )
    assert r["accepted"] == 1
    with services_of(line).sessions() as s:
        row = s.get(Sample, "u-0")
        assert row is not None
        assert (row.true_label, row.origin, row.label_source) == (4, "device_capture", "device")


def test_queue_round_trips_through_label_studio(line: TestClient) -> None:
    upload(line, [unlabelled("cam-1", f"u-{i}", true_label=i) for i in range(4)])
    tasks = line.get(
        "/api/v1/model-lines/digits/labelling-queue/export", params={"format": "label-studio"}
    ).json()
    assert len(tasks) == 4
    first = tasks[0]
    assert first["data"]["sample_id"] == "u-0"
    prefix = "data:image/png;base64,"
    assert first["data"]["image"].startswith(prefix)
    png = base64.b64decode(first["data"]["image"][len(prefix) :])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 64  # 8x8 digits scaled up to 64 px wide
    assert first["predictions"][0]["result"][0]["value"]["choices"] == ["5"]  # the model's guess
    config = line.get("/api/v1/model-lines/digits/labelling-queue/label-config").text
    assert '<Choices name="label" toName="image"' in config and '<Choice value="9"/>' in config

    # Three of four labelled in Label Studio; the fourth task comes back without an annotation.
    export = annotated(tasks, {"u-0": "0", "u-1": "1", "u-2": "2"})
    r = line.post("/api/v1/labels/import", json=export)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["labelled"], body["unchanged"], body["skipped"]) == (3, 0, 1)
    assert body["conflicts"] == [] and body["labelled_by"] == "admin"
    assert len(body["jobs_triggered"]) == 1  # threshold 3 reached by the operator's labels
    with services_of(line).sessions() as s:
        rows = {x.sample_id: x for x in s.scalars(select(Sample))}
        audits = s.scalars(
            select(AuditRecord).where(AuditRecord.action == "samples.label_import")
        ).all()
    assert [(rows[f"u-{i}"].true_label, rows[f"u-{i}"].label_source) for i in range(3)] == [
        (0, "operator"),
        (1, "operator"),
        (2, "operator"),
    ]
    assert rows["u-0"].labelled_by == "admin" and rows["u-0"].labelled_at is not None
    assert rows["u-3"].true_label is None
    assert len(audits) == 1 and audits[0].details["labelled"] == 3
    assert line.get("/api/v1/model-lines/digits/labelling-queue").json()["queued"] == 1

    # The same file again: idempotent.
    again = line.post("/api/v1/labels/import", json=export).json()
    assert (again["labelled"], again["unchanged"], again["jobs_triggered"]) == (0, 3, [])
    # Another label for a labelled sample: kept, reported as a conflict.
    changed = line.post("/api/v1/labels/import", json=annotated(tasks[:1], {"u-0": "8"})).json()
    assert changed["labelled"] == 0 and len(changed["conflicts"]) == 1
    assert "already labelled '0'" in changed["conflicts"][0]["reason"]
    with services_of(line).sessions() as s:
        assert s.get(Sample, "u-0").true_label == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mangle", "names"),
    [
        (lambda e: {"tasks": e}, "a Label Studio JSON export is a list of tasks"),
        (lambda e: e[:1] + [{"id": 77, "annotations": []}], "task 1 (id 77): has no data"),
        (
            lambda e: e[:1] + [{**e[1], "annotations": {"oops": 1}}],
            "task 1 (id 501), sample u-1: annotations must be a list",
        ),
        (
            lambda e: (
                e[:1]
                + [{**e[1], "annotations": [{"result": [{"value": {"choices": ["1", "2"]}}]}]}]
            ),
            "task 1 (id 501), sample u-1: annotations[0].result[0].value.choices must hold",
        ),
        (
            lambda e: (
                e[:1]
                + [{**e[1], "annotations": [{"result": [{"value": {"choices": ["eleven"]}}]}]}]
            ),
            "task 1 (id 501), sample u-1: 'eleven' is not a label of model line 'digits'",
        ),
        (
            lambda e: e[:1] + [{**e[1], "data": {**e[1]["data"], "sample_id": "nope"}}],
            "task 1 (id 501), sample nope: no such sample on this server",
        ),
    ],
)
def test_a_malformed_import_names_the_task_and_changes_nothing(
    line: TestClient, mangle: Any, names: str
) -> None:
    upload(line, [unlabelled("cam-1", f"u-{i}") for i in range(2)])
    tasks = line.get("/api/v1/model-lines/digits/labelling-queue/export").json()
    export = annotated(tasks, {"u-0": "3", "u-1": "3"})
    r = line.post("/api/v1/labels/import", json=mangle(export))
    assert r.status_code == 422, r.text
    assert names in r.json()["detail"]
    # The valid first task was not applied either: all or nothing.
    assert line.get("/api/v1/model-lines/digits/labelling-queue").json()["queued"] == 2
    assert jobs(line) == []


def test_import_needs_an_operator_and_json(line: TestClient) -> None:
    bad = line.post(
        "/api/v1/labels/import", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422 and "not JSON" in bad.json()["detail"]
    anonymous = line.post(
        "/api/v1/labels/import", json=[], headers={"Authorization": "Bearer wrong"}
    )
    assert anonymous.status_code == 401


def test_the_dataset_manifest_counts_where_labels_came_from(
    line: TestClient, tmp_path: Path
) -> None:
    services = services_of(line)
    upload(line, [sample("cam-1", sample_id=f"d-{i}", true_label=1) for i in range(2)])
    upload(line, [unlabelled("cam-2", f"c-{i}", true_label=6) for i in range(3)])
    upload(line, [sample("cam-2", sample_id="c-0", true_label=6)])  # device fills one
    tasks = line.get("/api/v1/model-lines/digits/labelling-queue/export").json()
    assert (
        line.post("/api/v1/labels/import", json=annotated(tasks, {"c-1": "6"})).status_code == 200
    )
    # c-2 is still unlabelled: exported to the trainer it would have no label.
    worker = services.jobs.worker
    assert worker is not None  # the embedded worker (development)
    with services.sessions() as s:
        queued = s.scalars(select(TrainingJob)).first()
        assert queued is not None
        # Claimed as the worker claims it: the dataset is read under the job's lease.
        job = job_queue.claim_job(s, now=utcnow(), runner=worker.identity)
    assert job is not None and job.id == queued.id
    workdir = tmp_path / "job"
    workdir.mkdir()
    worker._prepare(job, workdir)  # what the worker hands the trainer
    exported = load_samples(workdir / "samples.npz", 64)
    by_id = dict(zip(exported.sample_ids.tolist(), exported.label_sources.tolist(), strict=True))
    assert by_id == {
        "d-0": "device",
        "d-1": "device",
        "c-0": "device_capture+device",
        "c-1": "device_capture+operator",
    }
    dataset = build_dataset(digits_pools().train, exported, field_fraction=0.0)
    assert dataset.manifest["label_sources"]["accepted"] == {
        "device": 2,
        "device_capture+device": 1,
        "device_capture+operator": 1,
    }
    json.dumps(dataset.manifest)  # stored as JSON by lineage


def test_parse_label_studio_takes_the_newest_annotation() -> None:
    export = [
        {
            "id": 1,
            "data": {"sample_id": "s-1"},
            "annotations": [
                {"result": [{"type": "choices", "value": {"choices": ["2"]}}]},
                {"result": [{"type": "textarea", "value": {"text": ["note"]}}]},
                {"result": [{"type": "choices", "value": {"choices": ["4"]}}]},
                {"was_cancelled": True, "result": [{"value": {"choices": ["9"]}}]},
            ],
        },
        {"id": 2, "data": {"sample_id": "s-2"}},  # not labelled yet
    ]
    labels, skipped = parse_label_studio(export)
    assert [(x.sample_id, x.choice) for x in labels] == [("s-1", "4")] and skipped == 1
    with pytest.raises(LabelFileError, match="labelled '5' here and '4' elsewhere"):
        parse_label_studio(
            export
            + [
                {
                    "id": 3,
                    "data": {"sample_id": "s-1"},
                    "annotations": [{"result": [{"value": {"choices": ["5"]}}]}],
                }
            ]
        )


def test_the_labelling_summary_counts_the_queue_and_the_labels_by_source(
    line: TestClient,
) -> None:
    """What the dashboard's labelling panel reads (capture policies: the dashboard test)."""
    summary = "/api/v1/model-lines/digits/labelling-summary"
    assert line.get(summary).json() == {
        "model_line": "digits",
        "queued": 0,
        "labelled": {"device": 0, "operator": 0},
        "capture_policies": [],
    }
    upload(line, [sample("cam-1", sample_id=f"d-{i}", true_label=i) for i in range(2)])
    upload(line, [unlabelled("cam-2", f"u-{i}", true_label=i) for i in range(5)])
    upload(line, [sample("cam-2", sample_id="u-4", true_label=4)])  # the device fills one
    tasks = line.get("/api/v1/model-lines/digits/labelling-queue/export").json()
    imported = line.post("/api/v1/labels/import", json=annotated(tasks, {"u-0": "0", "u-1": "1"}))
    assert imported.json()["labelled"] == 2
    got = line.get(summary).json()
    assert (
        got["queued"]
        == 2
        == line.get("/api/v1/model-lines/digits/labelling-queue").json()["queued"]
    )
    assert got["labelled"] == {"device": 3, "operator": 2}
    assert line.get("/api/v1/model-lines/nope/labelling-summary").status_code == 404


def test_the_cli_exports_and_imports_label_studio_files(tmp_path: Path, signing_key: Any) -> None:
    """``edgeloop labels export LINE --format label-studio > tasks.json`` and ``edgeloop labels
    import FILE`` against a real server (uvicorn on a socket)."""
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path}/cli.db", signing_key_path=priv)
    app = create_app(settings)
    with (
        LiveServer(app) as live,
        httpx.Client(base_url=live.url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=30) as http,
    ):
        create_line(http, retrain_threshold=100)  # type: ignore[arg-type]
        register(http, "cam-1")  # type: ignore[arg-type]
        r = http.post("/api/v1/samples", json={"samples": [unlabelled("cam-1", "u-0", 4)]})
        assert r.json()["accepted"] == 1

        def cli(*args: str) -> Any:
            return CliRunner().invoke(
                cli_app, ["--server", live.url, "--token", TEST_ADMIN_TOKEN, *args]
            )

        out = cli("labels", "export", "digits", "--format", "label-studio")
        assert out.exit_code == 0, out.output
        tasks = json.loads(out.stdout)
        assert [t["data"]["sample_id"] for t in tasks] == ["u-0"]
        labelled = tmp_path / "labelled.json"
        labelled.write_text(json.dumps(annotated(tasks, {"u-0": "4"})))
        done = cli("labels", "import", str(labelled))
        assert done.exit_code == 0 and "1 sample(s) labelled by admin" in done.stdout
        broken = tmp_path / "broken.json"
        broken.write_text(json.dumps([{"id": 3, "data": {"sample_id": "u-0"}, "annotations": 7}]))
        refused = cli("labels", "import", str(broken))
        assert refused.exit_code == 1
        assert "task 0 (id 3), sample u-0: annotations must be a list" in refused.output
        assert cli("labels", "export", "digits", "--format", "csv").exit_code == 2
        queue = cli("labels", "queue", "digits")
        assert queue.exit_code == 0 and "0 sample(s) of digits wait for a label" in queue.stdout
        summary = cli("labels", "summary", "digits")
        assert summary.exit_code == 0, summary.output
        assert "digits: 0 sample(s) wait for a label; labelled 0 by device, 1 by operator" in (
            summary.stdout
        )


def test_screening_with_a_champion_takes_no_reference_from_the_queue(client: TestClient) -> None:
    """With a real champion, label screening runs on every upload and builds its reference from
    the line's labelled samples: queued (unlabelled) ones must not enter it, and a label filled
    later is screened like a new sample."""
    create_line(client, retrain_threshold=100)
    register(client, "cam-1")
    install_champion(services_of(client))
    upload(client, [unlabelled("cam-1", f"u-{i}", true_label=i) for i in range(3)])
    r = upload(client, [sample("cam-1", sample_id="d-0", true_label=3)])
    assert r["accepted"] == 1 and "quarantined" not in r
    # A flipped label filled by the device: model and neighbours disagree with it, held back.
    pool = digits_pools().field
    x = pool.X[np.flatnonzero(pool.y == 1)[0]]
    upload(client, [{**sample("cam-1", sample_id="u-x", x=x), "true_label": None}])
    filled = upload(client, [sample("cam-1", sample_id="u-x", x=x, true_label=7)])
    assert filled["accepted"] == 0 and [q["sample_id"] for q in filled["quarantined"]] == ["u-x"]
