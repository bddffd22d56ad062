"""Poisoning guard: per-device upload rate limit and daily quota, and label screening.

Real databases (SQLite and PostgreSQL), a real champion (scikit-learn exported to ONNX, run by
the server with onnxruntime), the real digits data and the real training pipeline for the
dataset version.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.core.errors import RateLimitedError
from server.db import job_queue, sample_store
from server.db.datasets import DatasetSample
from server.db.registry import ModelLine, ModelVersion
from server.db.sample_store import SampleUploadCount
from server.intake.screening import ScreenConfig, Screener, label_verdicts
from server.intake.upload_limits import SampleRateLimiter
from server.main import create_app
from server.release.signing import sign_release
from server.retrain.worker import export_base_pool
from server.services import Services
from tests.conftest import write_key_pair
from tests.server.conftest import (
    LINE,
    authed_client,
    create_line,
    make_settings,
    register,
    sample,
    services_of,
    wait_for,
)
from training.data import digits_pools, drift


def champion_onnx() -> bytes:
    from sklearn.linear_model import LogisticRegression

    from training.export import sklearn_to_onnx

    pools = digits_pools()
    clf = LogisticRegression(max_iter=1000).fit(pools.train.X, pools.train.y)
    return sklearn_to_onnx(clf, n_features=64)


_CHAMPION: list[bytes] = []


def install_champion(services: Services) -> None:
    """A real ONNX champion (v1) with its signed release, and the line's base pool in the store
    (what the training worker that trained it hands back: the server screens against it)."""
    if not _CHAMPION:
        _CHAMPION.append(champion_onnx())
    sha, size = services.store.put_bytes(_CHAMPION[0])
    with tempfile.TemporaryDirectory() as tmp:
        base = export_base_pool("digits", 64, Path(tmp) / "base.npz")
        assert base is not None
        base_sha, _ = services.store.put_file(base)
    with services.sessions() as session:
        ml = session.get(ModelLine, LINE)
        assert ml is not None
        ml.base_pool_sha256 = base_sha
        session.add(
            ModelVersion(
                line=LINE,
                version=1,
                status="champion",
                sha256=sha,
                size=size,
                trainer="sklearn-mlp",
                hyperparams={},
                metrics={},
                report={},
                sample_count=0,
            )
        )
        session.flush()
        rel = sign_release(
            session,
            signer=services.signer,
            line_name=LINE,
            model_version=1,
            now=services.clock(),
            ttl_days=30,
        )
        ml.champion_version = 1
        ml.current_release = rel.release
        session.commit()


def upload(client: TestClient, records: list[dict[str, Any]]) -> Any:
    return client.post("/api/v1/samples", json={"samples": records})


def digit_samples(
    device: str, X: np.ndarray, y: np.ndarray, *, prefix: str
) -> list[dict[str, Any]]:
    return [
        sample(device, sample_id=f"{prefix}-{i}", x=X[i], true_label=int(y[i]), predicted_label=0)
        for i in range(len(X))
    ]


def quarantine(client: TestClient) -> list[dict[str, Any]]:
    resp = client.get("/api/v1/samples/quarantine", params={"model_line": LINE, "limit": 1000})
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture
def line(client: TestClient) -> tuple[TestClient, Services]:
    create_line(client)
    services = services_of(client)
    install_champion(services)
    return client, services


def test_flipped_labels_are_quarantined_with_reason_and_left_out_of_the_dataset(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, db_url, signing_key_path=priv, training_python=sys.executable
    )
    with authed_client(create_app(settings)) as client:
        create_line(client, retrain_threshold=1000)
        services = services_of(client)
        install_champion(services)
        register(client, "mallory")
        register(client, "honest")
        field = digits_pools().field
        X, y = field.X[:60], field.y[:60]
        flipped = (y + 1 + np.arange(60) % 9) % 10  # always another digit
        assert np.all(flipped != y)
        # The honest device first, so the device check has someone to compare with.
        resp = upload(client, digit_samples("honest", X[:30], y[:30], prefix="h"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["accepted"] == 30
        honest_held = len(resp.json().get("quarantined", []))
        assert honest_held <= 2  # clean digits with their true labels pass
        resp = upload(client, digit_samples("mallory", X[30:], flipped[30:], prefix="m"))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["accepted"] == 30  # stored (nothing is lost), but held back
        held = {q["sample_id"]: q["reason"] for q in body["quarantined"]}
        assert len(held) >= 27, body
        listed = [q for q in quarantine(client) if q["device_id"] == "mallory"]
        assert len(listed) == 30  # the device check holds the rest too
        label_held = [q for q in listed if q["check"] == "label"]
        assert label_held and all(
            "contradicts the champion (v1 predicts" in q["reason"] for q in label_held
        )
        device_held = [q for q in listed if q["check"] == "device"]
        for q in device_held:
            assert q["reason"].startswith("device mallory: ")
            assert "contradict model and neighbours" in q["reason"]
        assert all(q["created_at"] for q in listed)
        # Screening is audited.
        audit_log = client.get(
            "/api/v1/audit", params={"action": "sample.quarantine", "limit": 1000}
        ).json()["records"]
        assert len(audit_log) >= 27 and audit_log[0]["actor"] == "screening"

        # The next dataset version holds none of them.
        resp = client.post("/api/v1/training-jobs", json={"model_line": LINE})
        assert resp.status_code == 201, resp.text
        assert services.jobs.run_once() == resp.json()["id"]
        with services.sessions() as session:
            job = job_queue.get_job(session, job_id=resp.json()["id"])
            assert job.dataset_version, job.error
            ids = set(
                session.scalars(
                    select(DatasetSample.sample_id).where(
                        DatasetSample.dataset_version == job.dataset_version
                    )
                )
            )
        assert not any(i.startswith("m-") for i in ids)
        assert sum(1 for i in ids if i.startswith("h-")) >= 28


def test_honest_drifted_samples_mostly_pass(line) -> None:
    client, _services = line
    field = digits_pools().field
    n_devices, per_device = 4, 50
    X = drift(field.X[: n_devices * per_device], severity=1.0, seed=7)
    y = field.y[: n_devices * per_device]
    held = 0
    for d in range(n_devices):
        register(client, f"cam-{d}")
        part = slice(d * per_device, (d + 1) * per_device)
        resp = upload(client, digit_samples(f"cam-{d}", X[part], y[part], prefix=f"d{d}"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["accepted"] == per_device
        held += len(resp.json().get("quarantined", []))
    pass_rate = 1 - held / (n_devices * per_device)
    print(f"honest drifted samples passing screening: {pass_rate:.3f}")
    assert pass_rate >= 0.75
    assert not any(q["check"] == "device" for q in quarantine(client))


def test_an_operator_can_release_a_quarantined_sample(line) -> None:
    client, services = line
    register(client, "cam-1")
    field = digits_pools().field
    wrong = (field.y[:1] + 5) % 10
    resp = upload(client, digit_samples("cam-1", field.X[:1], wrong, prefix="q"))
    assert [q["sample_id"] for q in resp.json()["quarantined"]] == ["q-0"]
    with services.sessions() as session:
        assert "q-0" not in {r.sample_id for r in sample_store.samples_of_line(session, line=LINE)}
    resp = client.post("/api/v1/samples/q-0/release")
    assert resp.status_code == 200, resp.text
    assert client.post("/api/v1/samples/q-0/release").status_code == 404
    with services.sessions() as session:
        assert "q-0" in {r.sample_id for r in sample_store.samples_of_line(session, line=LINE)}
    assert quarantine(client) == []
    released = client.get(
        "/api/v1/samples/quarantine", params={"model_line": LINE, "include_released": True}
    ).json()
    assert released[0]["released_by"]
    assert client.get("/api/v1/audit", params={"action": "sample.release"}).json()["records"]


def test_no_champion_means_no_label_screening(client: TestClient) -> None:
    create_line(client)
    register(client, "cam-1")
    field = digits_pools().field
    resp = upload(client, digit_samples("cam-1", field.X[:5], (field.y[:5] + 1) % 10, prefix="n"))
    assert resp.status_code == 200 and "quarantined" not in resp.json()


def test_rate_limit_returns_429_with_retry_after_and_keeps_what_was_stored(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    # Burst of 10 samples, refilled at one sample per 100 minutes: no refill during the test.
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        sample_rate_per_device_per_min=0.01,
        sample_burst_per_device=10,
    )
    with authed_client(create_app(settings)) as client:
        create_line(client)
        register(client, "cam-1")
        register(client, "cam-2")
        resp = upload(client, [sample("cam-1", sample_id=f"a{i}") for i in range(10)])
        assert resp.status_code == 200 and resp.json()["accepted"] == 10
        resp = upload(client, [sample("cam-1", sample_id="a10")])
        assert resp.status_code == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert "over its upload rate" in resp.json()["detail"]
        resp = upload(client, [sample("cam-1", sample_id=f"big{i}") for i in range(11)])
        assert resp.status_code == 429 and "send smaller batches" in resp.json()["detail"]
        # Another device has its own allowance; what cam-1 stored is all still there.
        assert upload(client, [sample("cam-2", sample_id="b0")]).status_code == 200
        services = services_of(client)
        with services.sessions() as session:
            ids = {r.sample_id for r in sample_store.samples_of_line(session, line=LINE)}
        assert ids == {f"a{i}" for i in range(10)} | {"b0"}


def test_daily_quota_holds_across_two_app_instances(tmp_path: Path, pg_url: str, signing_key):
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, pg_url, signing_key_path=priv, sample_quota_per_device_per_day=30
    )
    with authed_client(create_app(settings)) as a:
        create_line(a)
        register(a, "cam-1")
        with TestClient(create_app(settings)) as b:
            b.auth = a.auth  # the same operator and device credentials
            assert (
                upload(a, [sample("cam-1", sample_id=f"a{i}") for i in range(20)]).json()[
                    "accepted"
                ]
                == 20
            )
            assert (
                upload(b, [sample("cam-1", sample_id=f"b{i}") for i in range(10)]).json()[
                    "accepted"
                ]
                == 10
            )
            for client in (a, b):
                resp = upload(client, [sample("cam-1", sample_id="over")])
                assert resp.status_code == 429, resp.text
                assert "daily quota of 30 samples" in resp.json()["detail"]
                assert int(resp.headers["Retry-After"]) >= 1
            # A retried batch of stored ids is a duplicate, not a new charge.
            again = upload(b, [sample("cam-1", sample_id="a0")])
            assert again.status_code == 200 and again.json()["duplicates"] == 1
            with services_of(a).sessions() as session:
                counts = session.scalars(select(SampleUploadCount.count)).all()
                stored = len(sample_store.samples_of_line(session, line=LINE))
            assert counts == [30] and stored == 30


# ---------------------------------------------------------------- pure cores


def test_label_verdicts_need_both_the_champion_and_the_neighbours_to_disagree() -> None:
    ref_X = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [1.0, 1.0], [0.9, 1.0], [1.0, 0.9]])
    ref_y = np.array([0, 0, 0, 1, 1, 1])
    X = np.array([[0.05, 0.05], [0.05, 0.05], [0.95, 0.95]], dtype=np.float32)
    y = np.array([1, 1, 1])
    cfg = ScreenConfig(k=3, min_agreement=1)
    # Sample a: champion says 0, neighbours say 0 -> held. Sample b: champion agrees -> kept.
    # Sample c: neighbours agree -> kept.
    verdicts = label_verdicts(
        ["a", "b", "c"],
        X,
        y,
        champion_pred=np.array([0, 1, 0]),
        champion_version=4,
        ref_X=ref_X,
        ref_y=ref_y,
        config=cfg,
    )
    assert [v.sample_id for v in verdicts] == ["a"]
    assert "v4 predicts 0" in verdicts[0].reason and "0 of 3" in verdicts[0].reason


def test_label_verdicts_spare_a_sample_whose_neighbours_do_not_back_the_champion() -> None:
    # A drifted input: the champion is wrong on it, and its clean neighbours are scattered over
    # several labels, none of them its own. Nothing contradicts the label strongly: kept. The
    # same input with neighbours that back the champion is held.
    X = np.array([[0.5, 0.5]], dtype=np.float32)
    y = np.array([3])
    scattered_y = np.array([0, 1, 2, 0, 1, 2])
    backing_y = np.array([0, 0, 0, 0, 1, 2])
    ref_X = np.array([[0.5, 0.51], [0.51, 0.5], [0.49, 0.5], [0.5, 0.49], [0.9, 0.9], [0.1, 0.1]])
    cfg = ScreenConfig(k=4, min_agreement=1, min_contradiction=3)
    common = dict(champion_pred=np.array([0]), champion_version=2, ref_X=ref_X, config=cfg)
    assert label_verdicts(["d"], X, y, ref_y=scattered_y, **common) == []
    held = label_verdicts(["d"], X, y, ref_y=backing_y, **common)
    assert [v.sample_id for v in held] == ["d"] and "4 carry 0" in held[0].reason


def test_rate_limiter_refills_with_its_clock() -> None:
    now = [0.0]
    lim = SampleRateLimiter(per_min=60, burst=5, clock=lambda: now[0])
    lim.take("d", 5)
    with pytest.raises(RateLimitedError) as exc:
        lim.take("d", 2)
    assert exc.value.retry_after_s == 3  # 2 samples at 1/s, rounded up
    now[0] = 2.0
    lim.take("d", 2)
    lim.take("other", 5)
    SampleRateLimiter(per_min=0, burst=1).take("d", 10**6)  # 0: no limit


def test_the_agent_keeps_a_rate_limited_batch_and_waits_retry_after(
    tmp_path: Path, signing_key
) -> None:
    """The device agent's uploader against the real server over HTTP: 429 is transient."""
    import threading

    import httpx

    from contract.messages import SampleRecord, encode_input
    from device_agent.capture import Spool, Uploader
    from device_agent.http import HttpClient
    from tests.authkit import bootstrap_token
    from tests.conftest import TEST_ADMIN_TOKEN, auth_headers
    from tests.device_agent.agent_testkit import make_config
    from tests.server.live_server import LiveServer

    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path}/edgeloop.db",
        signing_key_path=priv,
        sample_rate_per_device_per_min=0.01,
        sample_burst_per_device=3,
    )
    app = create_app(settings)
    with LiveServer(app) as srv:
        admin = httpx.Client(base_url=srv.url, headers=auth_headers(TEST_ADMIN_TOKEN))
        create_line(admin)
        resp = admin.post(
            "/api/v1/devices/enroll",
            json={
                "bootstrap_token": bootstrap_token(admin),
                "device_id": "dev-1",
                "model_line": LINE,
            },
        )
        assert resp.status_code == 201, resp.text
        credential = resp.json()["credential"]
        field = digits_pools().field
        spool = Spool(tmp_path / "spool", batch_max=3, max_bytes=1 << 20)
        for i in range(5):
            spool.add(
                SampleRecord(
                    sample_id=f"r{i}",
                    device_id="dev-1",
                    model_line=LINE,
                    model_version=1,
                    input_b64=encode_input(field.X[i]),
                    true_label=int(field.y[i]),
                    predicted_label=0,
                    confidence=0.5,
                    captured_at=1.0,
                )
            )
        cfg = make_config(tmp_path / "agent", signing_key, server_url=srv.url)
        with HttpClient(timeout_s=10) as client:
            client.set_bearer(credential, origin=srv.url)
            up = Uploader(cfg, spool=spool, client=client, stop=threading.Event())
            assert up.upload_once() is False  # first batch stored, second refused with 429
        assert "HTTP 429" in (up.last_error or "") and "upload rate" in (up.last_error or "")
        assert up.retry_after_s >= 1
        stats = spool.stats()
        assert (stats.uploaded, stats.pending, stats.rejected) == (3, 2, 0)  # kept for later
        with app.state.services.sessions() as session:
            stored = {r.sample_id for r in sample_store.samples_of_line(session, line=LINE)}
        assert stored == {"r0", "r1", "r2"}
        admin.close()


def test_cli_lists_the_quarantine_with_reasons(tmp_path: Path, signing_key) -> None:
    from typer.testing import CliRunner

    from server.cli.main import app as cli_app
    from tests.conftest import TEST_ADMIN_TOKEN
    from tests.server.live_server import LiveServer

    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path}/e.db", signing_key_path=priv))
    with LiveServer(app) as srv:
        client = authed_client(app)
        with client:
            create_line(client)
            install_champion(services_of(client))
            register(client, "cam-1")
            field = digits_pools().field
            resp = upload(
                client, digit_samples("cam-1", field.X[:1], (field.y[:1] + 5) % 10, prefix="c")
            )
            assert [q["sample_id"] for q in resp.json()["quarantined"]] == ["c-0"]
        result = CliRunner().invoke(
            cli_app,
            [
                "--server",
                srv.url,
                "--token",
                TEST_ADMIN_TOKEN,
                "samples",
                "quarantine",
                "--line",
                LINE,
            ],
        )
        as_json = CliRunner().invoke(
            cli_app,
            ["--server", srv.url, "--token", TEST_ADMIN_TOKEN, "--json"]
            + ["samples", "quarantine", "--line", LINE],
        )
    assert result.exit_code == 0, result.output
    assert result.output.split()[:3] == ["c-0", "cam-1", "label"]
    assert "contradicts the champion" in result.output
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.output)
    assert [(q["sample_id"], q["device_id"], q["check"]) for q in listed] == [
        ("c-0", "cam-1", "label")
    ]


# ---------------------------------------------------------------- screening and the write lock


class GatedScreener(Screener):
    """The real screener, held at its first champion inference until the test lets it go."""

    def __init__(self, config: ScreenConfig, store: Any) -> None:
        super().__init__(config, store)
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self._first = threading.Lock()

    def _predict(self, sha256: str, X: np.ndarray) -> np.ndarray:
        if self._first.acquire(blocking=False):  # only the first call waits
            self.entered.set()
            assert self.proceed.wait(timeout=GATE_WAIT_S), "the test never let screening go"
        return super()._predict(sha256, X)


GATE_WAIT_S = 120.0  # seconds: a deadline for a failing test, not a measurement


def test_screening_holds_no_write_lock_and_a_retry_meanwhile_is_not_counted_twice(
    tmp_path: Path, db_url: str, signing_key
) -> None:
    """While one upload's screening is held, an operator's approval, another device's upload
    and the same batch retried by its device all complete; the held upload then finds its rows
    stored and counts, charges and quarantines nothing a second time."""
    import httpx

    from tests.authkit import FleetAuth
    from tests.conftest import TEST_ADMIN_TOKEN
    from tests.server.conftest import add_version
    from tests.server.live_server import LiveServer

    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path, db_url, signing_key_path=priv, sample_quota_per_device_per_day=1000
    )
    app = create_app(settings)
    with LiveServer(app) as srv:
        # A generous client timeout: on failure the approval waits out the server's writer queue.
        http = httpx.Client(base_url=srv.url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=90)
        services: Services = app.state.services
        create_line(http, retrain_threshold=1000)
        install_champion(services)
        add_version(services, version=2, status="candidate")
        register(http, "mallory")
        register(http, "honest")
        rollout = http.post("/api/v1/rollouts", json={"model_line": LINE, "model_version": 2})
        assert rollout.status_code == 201, rollout.text
        assert services.screener is not None
        gate = GatedScreener(services.screener.config, services.store)
        services.screener = gate
        field = digits_pools().field
        flipped = (field.y[:10] + 3) % 10
        # From devices on v2, the version the fleet is moving to: they count toward training.
        batch = [
            {**r, "model_version": 2}
            for r in digit_samples("mallory", field.X[:10], flipped, prefix="m")
        ]
        honest_batch = [
            {**r, "model_version": 2}
            for r in digit_samples("honest", field.X[10:20], field.y[10:20], prefix="h")
        ]
        first: dict[str, Any] = {}
        uploader = threading.Thread(
            target=lambda: first.update(resp=upload(http, batch)), name="held-upload"
        )
        uploader.start()
        try:
            assert gate.entered.wait(timeout=GATE_WAIT_S), "the upload never reached screening"
            approved = http.post(f"/api/v1/rollouts/{rollout.json()['id']}/approve", json={})
            assert approved.status_code == 200, approved.text
            honest = upload(http, honest_batch)
            assert honest.status_code == 200 and honest.json()["accepted"] == 10, honest.text
            retried = upload(http, batch)  # the device retries: its first try looks lost
            assert retried.status_code == 200, retried.text
        finally:
            gate.proceed.set()
            uploader.join(timeout=GATE_WAIT_S)
        assert not uploader.is_alive()
        assert retried.json()["accepted"] == 10
        held = {q["sample_id"] for q in retried.json()["quarantined"]}
        assert len(held) >= 8  # flipped digits: the champion and the neighbours disagree
        late = first["resp"]
        assert late.status_code == 200, late.text
        assert late.json() == {"accepted": 0, "duplicates": 10, "rejected": []}
        listed = [q for q in quarantine(http) if q["device_id"] == "mallory"]
        assert sorted(q["sample_id"] for q in listed) == sorted(held)  # once each
        counted = 10 - len(honest.json().get("quarantined", [])) + 10 - len(held)
        with services.sessions() as session:
            line_row = session.get(ModelLine, LINE)
            assert line_row is not None and line_row.new_samples == counted > 0
            charged = dict(
                session.execute(select(SampleUploadCount.device_id, SampleUploadCount.count)).all()
            )
        assert charged == {"mallory": 10, "honest": 10}
        http.close()


def _one_slot_held(tmp_path: Path, signing_key, *, wait_s: float) -> Any:
    """A live server with one upload slot, and cam-1's upload holding it in screening."""
    import contextlib

    import httpx

    from tests.authkit import FleetAuth
    from tests.conftest import TEST_ADMIN_TOKEN
    from tests.server.live_server import LiveServer

    @contextlib.contextmanager
    def held() -> Any:
        priv, _ = write_key_pair(tmp_path / "keys", signing_key)
        settings = make_settings(
            tmp_path,
            f"sqlite:///{tmp_path}/edgeloop.db",
            signing_key_path=priv,
            sample_uploads_in_flight=1,
            sample_upload_wait_s=wait_s,
            # 10 samples per device, refilled at one per 100 minutes: no refill in the test.
            sample_rate_per_device_per_min=0.01,
            sample_burst_per_device=10,
        )
        app = create_app(settings)
        with LiveServer(app) as srv:
            http = httpx.Client(base_url=srv.url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=90)
            services: Services = app.state.services
            create_line(http)
            install_champion(services)
            register(http, "cam-1")
            register(http, "cam-2")
            assert services.screener is not None
            gate = GatedScreener(services.screener.config, services.store)
            services.screener = gate
            field = digits_pools().field
            first: dict[str, Any] = {}
            batch = digit_samples("cam-1", field.X[:5], field.y[:5], prefix="a")
            holder = threading.Thread(target=lambda: first.update(resp=upload(http, batch)))
            holder.start()
            try:
                assert gate.entered.wait(timeout=GATE_WAIT_S), "the upload never reached screening"
                yield http, services, gate
            finally:
                gate.proceed.set()
                holder.join(timeout=GATE_WAIT_S)
                http.close()
            assert not holder.is_alive() and first["resp"].json()["accepted"] == 5

    return held()


def cam2_batch() -> list[dict[str, Any]]:
    field = digits_pools().field
    return digit_samples("cam-2", field.X[5:15], field.y[5:15], prefix="b")


def stored_ids(services: Services) -> set[str]:
    with services.sessions() as session:
        return {r.sample_id for r in sample_store.samples_of_line(session, line=LINE)}


def test_an_upload_waits_for_a_slot_holding_no_thread_while_an_approval_passes(
    tmp_path: Path, signing_key
) -> None:
    """With the one upload slot taken (held in screening), another device's batch waits its
    turn; an operator's write goes through meanwhile; once the slot is free the batch is stored."""
    with _one_slot_held(tmp_path, signing_key, wait_s=GATE_WAIT_S) as (http, services, gate):
        slots = services.upload_slots
        assert slots is not None and slots.busy == 1
        second: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: second.update(resp=upload(http, cam2_batch())))
        waiter.start()
        wait_for(lambda: slots.waiting == 1, timeout=GATE_WAIT_S, what="cam-2 waiting for a slot")
        assert not any(s.startswith("b-") for s in stored_ids(services))
        token = http.post("/api/v1/enrollment-tokens", json={"max_uses": 1})  # a write
        assert token.status_code == 201, token.text
        gate.proceed.set()
        waiter.join(timeout=GATE_WAIT_S)
        assert not waiter.is_alive()
        assert second["resp"].status_code == 200 and second["resp"].json()["accepted"] == 10
        assert slots.busy == 0 and slots.waiting == 0


def test_an_upload_with_no_slot_in_time_gets_503_and_spends_nothing(
    tmp_path: Path, signing_key
) -> None:
    """No slot within sample_upload_wait_s (0: none at once): 503, nothing stored, no rate
    allowance spent; once the slot is free the same batch is stored whole."""
    with _one_slot_held(tmp_path, signing_key, wait_s=0) as (http, services, gate):
        busy = upload(http, cam2_batch())
        assert busy.status_code == 503, busy.text
        assert busy.json()["detail"] == (
            "sample intake is busy: no upload slot (of 1) came free within 0 s; retry later"
        )
        gate.proceed.set()
        slots = services.upload_slots
        assert slots is not None
        wait_for(lambda: slots.busy == 0, timeout=GATE_WAIT_S, what="the slot free")
        assert not any(s.startswith("b-") for s in stored_ids(services))
        again = upload(http, cam2_batch())  # all 10 of cam-2's allowance is still there
        assert again.status_code == 200 and again.json()["accepted"] == 10, again.text


def test_rows_not_assessed_before_the_write_are_screened_in_it(line) -> None:
    """Without a read session (a script, a test), and for a row whose content changed since the
    assessment, screening runs in the write transaction: nothing is stored unscreened."""
    from sqlalchemy import insert

    from server.db.sample_store import Sample
    from server.intake.samples import _sort_batch, upload_samples

    client, services = line
    register(client, "cam-1")
    field = digits_pools().field
    wrong = (field.y[:4] + 5) % 10
    records = digit_samples("cam-1", field.X[:4], wrong, prefix="w")
    assert services.screener is not None
    with services.sessions() as session:  # no read session: all assessed in the write
        result = upload_samples(
            session, records=records[:2], now=services.clock(), screener=services.screener
        )
    assert result.accepted == 2 and {q["sample_id"] for q in result.quarantined} == {"w-0", "w-1"}
    # An assessment of other content under the same ids covers nothing of what is stored.
    decoy = digit_samples("cam-1", field.X[10:12], field.y[10:12], prefix="w")[:2]
    decoy = [{**d, "sample_id": r["sample_id"]} for d, r in zip(decoy, records[2:], strict=True)]
    with services.sessions() as session, services.sessions() as reads:
        stale = services.screener.assess(
            reads, rows=list(_sort_batch(reads, decoy, services.clock()).fresh.values())
        )
        reads.rollback()
        assert stale.assessed and not stale.verdicts
        rows = list(_sort_batch(session, records[2:], services.clock()).fresh.values())
        session.execute(insert(Sample), rows)  # as the upload's write transaction does
        held = services.screener.apply(session, rows=rows, assessment=stale, now=services.clock())
        session.rollback()
    assert set(held) == {"w-2", "w-3"}
