"""HTTP API: happy paths, signed releases, artifact ranges, and malformed requests."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from contract import SignatureError, load_public_key, verify_manifest
from server.db.fleet import Device, DeviceEvent, DeviceMetric
from server.db.sample_store import Sample
from tests.server.conftest import add_version, create_line, register, sample, services_of


@pytest.fixture
def seeded(client: TestClient) -> TestClient:
    create_line(client)
    register(client, "cam-1")
    register(client, "cam-2")
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    assert (
        client.post(
            "/api/v1/samples", json={"samples": [sample("cam-1", sample_id="keep-me")]}
        ).json()["accepted"]
        == 1
    )
    return client


def test_register_is_idempotent_upsert(client: TestClient) -> None:
    create_line(client)
    register(client, "cam-1")
    again = client.post(
        "/api/v1/devices/register",
        json={
            "device_id": "cam-1",
            "model_line": "digits",
            "hardware": "rpi4",
            "groups": ["hall-a"],
        },
    )
    assert again.status_code == 200 and again.json()["hardware"] == "rpi4"
    assert [d["device_id"] for d in client.get("/api/v1/devices").json()] == ["cam-1"]
    # Registering needs the device's own credential; enrollment checks the line and the id.
    unenrolled = client.post(
        "/api/v1/devices/register", json={"device_id": "cam-2", "model_line": "digits"}
    )
    assert unenrolled.status_code == 401
    token = client.post("/api/v1/enrollment-tokens", json={"max_uses": 5}).json()["token"]
    for device_id, line, code in (("cam-2", "nope", 404), ("a/b", "digits", 422)):
        body = {"bootstrap_token": token, "device_id": device_id, "model_line": line}
        assert client.post("/api/v1/devices/enroll", json=body).status_code == code


def test_target_before_and_after_first_release(client: TestClient) -> None:
    create_line(client)
    register(client, "cam-1")
    resp = client.get("/api/v1/devices/cam-1/target")
    assert resp.status_code == 404 and "no signed release" in resp.json()["detail"]
    add_version(services_of(client), version=1, status="champion", champion_release=True)
    target = client.get("/api/v1/devices/cam-1/target").json()
    assert target["rollout_id"] is None
    assert target["artifact_url"].endswith("/api/v1/artifacts/" + target["artifact_url"][-64:])
    assert client.get("/api/v1/devices/ghost/target").status_code == 401  # not enrolled


def test_signed_release_verifies_with_the_servers_public_key(seeded: TestClient, settings) -> None:
    env = seeded.get("/api/v1/model-lines/digits/releases/1").json()["envelope"]
    pub = load_public_key((settings.signing_key_file.with_name("signing.pub.pem")).read_bytes())
    m = verify_manifest(env, [pub], now=datetime.now(UTC))
    assert (m.model_line, m.release, m.model_version) == ("digits", 1, 1)
    assert m.artifact.name == "model.onnx" and m.labels == tuple(str(i) for i in range(10))
    assert m.input_spec.features == 64 and m.extra["trainer"] == "sklearn-mlp"
    key_info = seeded.get("/api/v1/signing-key").json()
    assert load_public_key(key_info["public_key_pem"].encode()) is not None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with pytest.raises(SignatureError):
        verify_manifest(env, [Ed25519PrivateKey.generate().public_key()], now=datetime.now(UTC))


def test_artifact_download_with_ranges(seeded: TestClient) -> None:
    v1 = seeded.get("/api/v1/model-lines/digits/versions/1").json()
    sha, size = v1["sha256"], v1["size"]
    full = seeded.get(f"/api/v1/artifacts/{sha}")
    assert full.status_code == 200 and len(full.content) == size
    assert full.headers["accept-ranges"] == "bytes"
    part = seeded.get(f"/api/v1/artifacts/{sha}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == full.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    tail = seeded.get(f"/api/v1/artifacts/{sha}", headers={"Range": f"bytes={size - 5}-"})
    assert tail.status_code == 206 and tail.content == full.content[-5:]
    bad = seeded.get(f"/api/v1/artifacts/{sha}", headers={"Range": f"bytes={size + 10}-"})
    assert bad.status_code == 416
    assert seeded.get("/api/v1/artifacts/" + "0" * 64).status_code == 404
    assert seeded.get("/api/v1/artifacts/not-a-sha").status_code == 422


def test_versions_lineage_and_jobs(seeded: TestClient) -> None:
    versions = seeded.get("/api/v1/model-lines/digits/versions").json()
    assert [(v["version"], v["status"], v["parent_version"]) for v in versions] == [
        (1, "champion", None),
        (2, "candidate", 1),
    ]
    detail = seeded.get("/api/v1/model-lines/digits/versions/2").json()
    assert detail["dataset_version"] == "ds-2" and "report" in detail
    job = seeded.post("/api/v1/training-jobs", json={"model_line": "digits"})
    assert job.status_code == 201 and job.json()["trigger"] == "manual"
    assert seeded.post("/api/v1/training-jobs", json={"model_line": "digits"}).status_code == 409
    assert seeded.get(f"/api/v1/training-jobs/{job.json()['id']}").json()["status"] == "queued"
    assert len(seeded.get("/api/v1/training-jobs?model_line=digits").json()) == 1


def test_http_status_and_metrics_fallback_reach_the_db(seeded: TestClient) -> None:
    status = {
        "device_id": "cam-1",
        "ts": 1.0,
        "state": "installed",
        "model_line": "digits",
        "model_version": 1,
        "release": 1,
    }
    metrics = {
        "device_id": "cam-1",
        "ts": 2.0,
        "model_line": "digits",
        "model_version": 1,
        "window_s": 10.0,
        "inferences": 10,
        "errors": 0,
        "labelled": 5,
        "correct": 4,
        "latency_ms_p50": 1.0,
        "latency_ms_p95": 2.0,
    }
    assert seeded.post("/api/v1/devices/cam-1/status", json=status).status_code == 202
    assert seeded.post("/api/v1/devices/cam-1/metrics", json=metrics).status_code == 202
    services = services_of(seeded)
    assert services.ingest.drain() == 2
    device = seeded.get("/api/v1/devices/cam-1").json()
    assert device["state"] == "installed" and device["release"] == 1
    with services.sessions() as s:
        assert s.scalar(select(func.count()).select_from(DeviceMetric)) == 1
        assert s.scalar(select(func.count()).select_from(DeviceEvent)) == 1


ROLL = {"model_line": "digits", "model_version": 2}
STATUS_OK = {
    "device_id": "cam-1",
    "ts": 1.0,
    "state": "installed",
    "model_line": "digits",
    "model_version": 1,
    "release": 1,
}

# (method, path, kwargs for the client call) -> every one must be a 4xx.
BAD_REQUESTS = [
    ("post", "/api/v1/devices/register", {"content": b"{not json"}),
    ("post", "/api/v1/devices/register", {"json": []}),
    ("post", "/api/v1/devices/register", {"json": {"device_id": "x"}}),
    (
        "post",
        "/api/v1/devices/register",
        {"json": {"device_id": "a" * 200, "model_line": "digits"}},
    ),
    (
        "post",
        "/api/v1/devices/register",
        {"json": {"device_id": "bad\u0000id", "model_line": "digits"}},
    ),
    ("post", "/api/v1/devices/register", {"json": {"device_id": "ok", "model_line": "../etc"}}),
    (
        "post",
        "/api/v1/devices/register",
        {"json": {"device_id": "ok", "model_line": "digits", "groups": "x"}},
    ),
    (
        "post",
        "/api/v1/devices/register",
        {"json": {"device_id": "ok", "model_line": "digits", "hardware": "a\u0000b"}},
    ),
    ("get", "/api/v1/devices/ghost", {}),
    ("get", "/api/v1/devices/bad%00id", {}),
    ("get", "/api/v1/devices?model_line=%00", {}),
    ("get", "/api/v1/devices/ghost/target", {}),
    ("post", "/api/v1/devices/cam-1/status", {"content": b"nope"}),
    ("post", "/api/v1/devices/cam-1/status", {"json": {"device_id": "cam-1"}}),
    ("post", "/api/v1/devices/cam-1/status", {"json": {**STATUS_OK, "state": "exploded"}}),
    ("post", "/api/v1/devices/cam-1/status", {"json": {**STATUS_OK, "device_id": "cam-2"}}),
    ("post", "/api/v1/devices/ghost/status", {"json": {**STATUS_OK, "device_id": "ghost"}}),
    ("post", "/api/v1/devices/cam-1/metrics", {"json": {"device_id": "cam-1", "ts": 1}}),
    (
        "post",
        "/api/v1/devices/cam-1/metrics",
        {
            "json": {
                "device_id": "cam-1",
                "ts": 1.0,
                "model_line": "digits",
                "model_version": 1,
                "window_s": 1.0,
                "inferences": 1,
                "errors": 2,
                "labelled": 0,
                "correct": 0,
                "latency_ms_p50": 1,
                "latency_ms_p95": 1,
            }
        },
    ),
    ("post", "/api/v1/samples", {"content": b"[1,2"}),
    ("post", "/api/v1/samples", {"json": {"samples": "all of them"}}),
    ("post", "/api/v1/samples", {"json": {"other": []}}),
    ("post", "/api/v1/samples", {"json": None}),
    ("post", "/api/v1/model-lines", {"json": {"name": "x"}}),
    (
        "post",
        "/api/v1/model-lines",
        {
            "json": {
                "name": "digits",
                "input_spec": {
                    "name": "input",
                    "shape": [-1, 64],
                    "dtype": "float32",
                    "min": 0,
                    "max": 1,
                },
                "labels": ["a", "b"],
                "initial_training": False,
            }
        },
    ),
    (
        "post",
        "/api/v1/model-lines",
        {"json": {"name": "new", "input_spec": {"shape": "wide"}, "labels": ["a", "b"]}},
    ),
    (
        "post",
        "/api/v1/model-lines",
        {
            "content": b'{"name": "new", "input_spec": {"name": "input", "shape": [-1, 4], '
            b'"dtype": "float32", "min": 0, "max": 1}, "labels": ["a", "b"], '
            b'"hyperparams": {"lr": NaN}}',
            "headers": {"content-type": "application/json"},
        },
    ),
    (
        "post",
        "/api/v1/model-lines",
        {"json": {"name": "new", "trainer": "magic", "input_spec": {}, "labels": []}},
    ),
    ("get", "/api/v1/model-lines/nope", {}),
    ("get", "/api/v1/model-lines/nope/versions", {}),
    ("get", "/api/v1/model-lines/digits/versions/99", {}),
    ("get", "/api/v1/model-lines/digits/versions/abc", {}),
    ("get", "/api/v1/model-lines/digits/versions/99999999999999999999", {}),
    ("get", "/api/v1/model-lines/digits/releases/0", {}),
    ("get", "/api/v1/model-lines/digits/releases/77", {}),
    ("get", "/api/v1/model-lines/digits/releases/-1", {}),
    ("get", "/api/v1/artifacts/xyz", {}),
    ("get", "/api/v1/artifacts/" + "A" * 64, {}),
    ("get", "/api/v1/artifacts/" + "f" * 64, {}),
    ("post", "/api/v1/training-jobs", {"json": {}}),
    ("post", "/api/v1/training-jobs", {"json": {"model_line": "nope"}}),
    ("post", "/api/v1/training-jobs", {"json": {"model_line": 5}}),
    ("get", "/api/v1/training-jobs/0", {}),
    ("get", "/api/v1/training-jobs/123456", {}),
    ("get", "/api/v1/training-jobs/12345678901234567890", {}),
    ("post", "/api/v1/rollouts", {"json": {}}),
    ("post", "/api/v1/rollouts", {"json": {**ROLL, "model_version": 99}}),
    ("post", "/api/v1/rollouts", {"json": {**ROLL, "model_version": 1}}),
    ("post", "/api/v1/rollouts", {"json": {**ROLL, "model_line": "nope"}}),
    ("post", "/api/v1/rollouts", {"json": {**ROLL, "canary_percent": 0}}),
    ("post", "/api/v1/rollouts", {"json": {**ROLL, "canary_percent": 101}}),
    ("post", "/api/v1/rollouts", {"json": {**ROLL, "created_by": ""}}),
    ("post", "/api/v1/rollouts", {"json": {**ROLL, "model_version": 2**40}}),
    ("get", "/api/v1/rollouts/999", {}),
    ("get", "/api/v1/rollouts/abc", {}),
    ("post", "/api/v1/rollouts/999/approve", {"json": {"approver": "bob"}}),
    ("post", "/api/v1/rollouts/1/approve", {"json": {}}),
    ("post", "/api/v1/rollouts/1/approve", {"content": b"garbage"}),
    ("post", "/api/v1/rollouts/999/pause", {}),
    ("post", "/api/v1/rollouts/999/resume", {}),
    ("post", "/api/v1/rollouts/999/abort", {}),
    ("post", "/api/v1/rollouts/1/abort", {"json": {"reason": 5}}),
    ("delete", "/api/v1/devices/cam-1", {}),
    # Registry, config and lineage.
    ("get", "/api/v1/model-lines/digits/aliases/best", {}),
    ("get", "/api/v1/model-lines/nope/aliases/champion", {}),
    ("get", "/api/v1/model-lines/nope/aliases", {}),
    ("get", "/api/v1/model-lines/digits/versions/99/lineage", {}),
    ("get", "/api/v1/model-lines/digits/versions/1/lineage?sample_limit=-1", {}),
    ("get", "/api/v1/model-lines/digits/versions/1/lineage?sample_limit=x", {}),
    ("get", "/api/v1/model-lines/digits/versions/99/report", {}),
    ("get", "/api/v1/model-lines/digits/versions/abc/artifacts", {}),
    ("get", "/api/v1/model-lines/nope/versions/1/artifacts", {}),
    ("get", "/api/v1/datasets/xyz", {}),
    ("get", "/api/v1/datasets/" + "0" * 64, {}),
    ("get", "/api/v1/datasets/" + "0" * 64 + "?offset=-3", {}),
    ("get", "/api/v1/samples/nope/lineage", {}),
    ("get", "/api/v1/samples/" + "x" * 70 + "/lineage", {}),
    ("get", "/api/v1/devices/ghost/lineage", {}),
    ("get", "/api/v1/devices/bad%00id/lineage", {}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {}}),
    ("put", "/api/v1/model-lines/digits/config", {"content": b"{oops"}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config": {"trainer": "svm"}}}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config": {"seed": -1}}}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config": {"base": "ftp://x"}}}),
    (
        "put",
        "/api/v1/model-lines/digits/config",
        {"json": {"config": {"gate": {"max_golden_drop": 5}}}},
    ),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config": {"gate": {"x": 1}}}}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config": {"hyperparamz": {}}}}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config_path": "../../etc/passwd"}}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config_path": "a/../../x.toml"}}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config_path": "missing.toml"}}),
    ("put", "/api/v1/model-lines/digits/config", {"json": {"config_path": "x.yaml"}}),
    (
        "put",
        "/api/v1/model-lines/digits/config",
        {"json": {"config": {}, "config_path": "a.toml"}},
    ),
    ("put", "/api/v1/model-lines/nope/config", {"json": {"config": {}}}),
    (
        "post",
        "/api/v1/model-lines",
        {
            "json": {
                "name": "new",
                "trainer": "torch-cnn",
                "config": {"trainer": "sklearn-mlp"},
                "input_spec": {
                    "name": "input",
                    "shape": [-1, 64],
                    "dtype": "float32",
                    "min": 0,
                    "max": 1,
                },
                "labels": ["a", "b"],
            }
        },
    ),
    (
        "post",
        "/api/v1/model-lines",
        {
            "json": {
                "name": "new",
                "config": {"schedule_s": 0},
                "input_spec": {
                    "name": "input",
                    "shape": [-1, 64],
                    "dtype": "float32",
                    "min": 0,
                    "max": 1,
                },
                "labels": ["a", "b"],
            }
        },
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    BAD_REQUESTS,
    ids=[f"{m}-{p[:60]}-{i}" for i, (m, p, _) in enumerate(BAD_REQUESTS)],
)
def test_malformed_requests_are_4xx_and_lose_nothing(
    seeded: TestClient, method: str, path: str, kwargs: dict
) -> None:
    resp = getattr(seeded, method)(path, **kwargs)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    body = resp.json()
    assert body.get("detail"), body
    # Everything stored before is still there and the API still works.
    services = services_of(seeded)
    services.ingest.drain()
    with services.sessions() as s:
        assert s.get(Sample, "keep-me") is not None
        assert s.scalar(select(func.count()).select_from(Device)) == 2
    line = seeded.get("/api/v1/model-lines/digits").json()
    assert line["champion_version"] == 1 and line["current_release"] == 1
    assert len(seeded.get("/api/v1/model-lines/digits/versions").json()) == 2


def test_http_status_with_a_field_out_of_range_is_stored_with_the_field_dropped(
    seeded: TestClient,
) -> None:
    """Same reading as MQTT ingest: the device is told what was dropped, the operator sees it."""
    for extra, note in (
        ({"model_version": 10**30}, "dropped model_version: out of range"),
        ({"ts": 10**400}, "dropped ts: out of range (server receive time used)"),
    ):
        resp = seeded.post("/api/v1/devices/cam-1/status", json={**STATUS_OK, **extra})
        assert resp.status_code == 202 and resp.json()["dropped"] == [note], resp.text
    assert services_of(seeded).ingest.drain() == 2
    events = seeded.get("/api/v1/devices/cam-1/events").json()
    assert [e["dropped"] for e in events] == [
        ["dropped ts: out of range (server receive time used)"],
        ["dropped model_version: out of range"],
    ]
    assert events[1]["model_version"] is None and events[0]["model_version"] == 1
    assert seeded.get("/api/v1/devices/cam-1/refused").json() == []


def test_rollout_state_conflicts(seeded: TestClient) -> None:
    created = seeded.post("/api/v1/rollouts", json=ROLL)
    assert created.status_code == 201 and created.json()["state"] == "pending_approval"
    rid = created.json()["id"]
    assert seeded.post("/api/v1/rollouts", json=ROLL).status_code == 409  # one active per line
    assert seeded.post(f"/api/v1/rollouts/{rid}/pause").status_code == 409
    assert seeded.post(f"/api/v1/rollouts/{rid}/resume").status_code == 409
    assert seeded.post(f"/api/v1/rollouts/{rid}/approve", json={}).status_code == 200
    assert seeded.post(f"/api/v1/rollouts/{rid}/approve", json={}).status_code == 409
    assert seeded.post(f"/api/v1/rollouts/{rid}/pause").json()["state"] == "paused"
    assert seeded.post(f"/api/v1/rollouts/{rid}/resume").json()["state"] == "canary"
    aborted = seeded.post(f"/api/v1/rollouts/{rid}/abort", json={"by": "admin", "reason": "test"})
    assert aborted.json()["state"] == "rolled_back"
    assert "aborted by admin" in aborted.json()["reason"]
    assert seeded.post(f"/api/v1/rollouts/{rid}/abort").status_code == 409


def test_rollout_detail_after_a_write_holds_no_transaction(seeded: TestClient) -> None:
    """The write handlers' closing read ends its transaction: on SQLite an open one holds the
    write lock until the session's teardown, which can wait behind every request thread."""
    from server.api.routes.rollouts import _detail
    from server.core.errors import NotFoundError

    rid = seeded.post("/api/v1/rollouts", json=ROLL).json()["id"]
    services = services_of(seeded)
    with services.sessions() as session:
        assert _detail(session, rid, services.settings)["id"] == rid
        assert not session.in_transaction()
        with pytest.raises(NotFoundError):
            _detail(session, 999, services.settings)
        assert not session.in_transaction()
