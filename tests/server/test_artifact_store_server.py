"""Past one machine: an artifact stored by one server reaches a device through another server,
or straight from the bucket, over real HTTP with Range (the device's resume).

The object store is a real S3-compatible HTTP server started here (moto's ThreadedMotoServer,
tests/server/s3_kit.py). Server A, which builds (stores) the model, runs in this process; server
B is a separate ``edgeloop-server`` process with its own data directory and no artifact of its
own, sharing only the database, the store and, as every replica must, the signing key and the
trust directory. The device side is the agent's own HttpFetcher and verify_artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from contract.manifest import ArtifactRef, verify_manifest
from device_agent.fetcher import HttpFetcher
from device_agent.verify import verify_artifact
from firmware_sim.services import ServerProcess
from server.api.routes.artifacts import ArtifactCache
from server.db.registry import ModelVersion
from server.main import create_app
from server.release.artifacts._store import CHUNK_BYTES
from server.services import Services
from tests.conftest import TEST_ADMIN_TOKEN, upgraded, write_key_pair
from tests.device_agent.agent_testkit import make_config
from tests.server.conftest import (
    LINE,
    add_version,
    authed_client,
    create_line,
    fake_python,
    make_settings,
    register,
    services_of,
)
from tests.server.live_server import LiveServer
from tests.server.s3_kit import ACCESS_KEY, REGION, SECRET_KEY, S3Server, s3_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def shared(tmp_path: Path, signing_key: Any) -> dict[str, Any]:
    """What every replica shares: database, signing key and trust dir (secret mounts)."""
    priv, _ = write_key_pair(tmp_path / "secrets" / "keys", signing_key)
    return {
        "db_url": upgraded(f"sqlite:///{tmp_path}/shared.db"),
        "signing_key_path": priv,
        "trust_dir": tmp_path / "secrets" / "trust",
    }


def server_a(tmp_path: Path, shared: dict[str, Any], **store: Any) -> TestClient:
    settings = make_settings(
        tmp_path,
        shared["db_url"],
        data_dir=tmp_path / "a",
        signing_key_path=shared["signing_key_path"],
        trust_dir=shared["trust_dir"],
        **store,
    )
    return authed_client(create_app(settings))


def download_like_a_device(
    url: str, ref: ArtifactRef, tmp_path: Path, signing_key: Any, *, have: bytes
) -> Path:
    """The agent's fetcher resumes from ``have`` (a .part left by a cut download)."""
    dest = tmp_path / "device" / "downloads" / f"{ref.sha256}.part"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(have)
    fetcher = HttpFetcher(make_config(tmp_path / "device" / "state", signing_key))
    try:
        fetcher.fetch(url, dest, expected_size=ref.size)
    finally:
        fetcher.close()
    verify_artifact(dest, ref)  # the device's own size + sha256 check against the signed ref
    return dest


def signed_ref(target: dict[str, Any], signing_key: Any) -> ArtifactRef:
    """What the device trusts: the artifact reference of the verified signed manifest."""
    manifest = verify_manifest(
        target["envelope"], [signing_key.public_key()], now=datetime.now(UTC)
    )
    return manifest.artifact


def test_a_server_that_did_not_build_the_model_serves_it_with_range(
    s3: S3Server, shared: dict[str, Any], tmp_path: Path, signing_key: Any
) -> None:
    bucket = s3.new_bucket()
    with server_a(tmp_path, shared, **s3.store_settings(bucket)) as a:
        create_line(a)
        mv = add_version(services_of(a), version=1, status="champion", champion_release=True)
    model = s3.client().get_object(Bucket=bucket, Key=f"models/{mv.sha256}")["Body"].read()
    assert hashlib.sha256(model).hexdigest() == mv.sha256
    assert not (tmp_path / "a" / "artifacts" / mv.sha256).exists()  # in the bucket only

    b = ServerProcess(
        tmp_path / "b",
        mqtt_port=9,
        env={
            "EDGELOOP_DATABASE_URL": shared["db_url"],
            "EDGELOOP_MQTT_ENABLED": "false",
            "EDGELOOP_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
            "EDGELOOP_SIGNING_KEY_PATH": str(shared["signing_key_path"]),
            "EDGELOOP_TRUST_DIR": str(shared["trust_dir"]),
            "EDGELOOP_ARTIFACT_STORE_URL": f"s3://{bucket}/models",
            # No EDGELOOP_ARTIFACT_S3_*: the standard AWS environment, as on a cloud host.
            "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        },
    )
    b.start()
    try:
        with httpx.Client(base_url=b.url, timeout=30) as http:
            credential = b.enroll("cam-1", LINE, token=None)
            target = http.get(
                "/api/v1/devices/cam-1/target",
                headers={"Authorization": f"Bearer {credential}"},
            ).json()
            ref = signed_ref(target, signing_key)
            assert ref.sha256 == mv.sha256
            assert target["artifact_url"] == f"{b.url}/api/v1/artifacts/{mv.sha256}"
            part = http.get(target["artifact_url"], headers={"Range": "bytes=100-199"})
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes 100-199/{len(model)}"
            assert part.content == model[100:200]
            dest = download_like_a_device(
                target["artifact_url"], ref, tmp_path, signing_key, have=model[:1000]
            )
            assert dest.read_bytes() == model
        assert not list((tmp_path / "b").glob("artifacts/*"))  # B served it from the bucket
    finally:
        b.stop()


def test_devices_download_from_the_base_url_without_the_server(
    s3: S3Server, shared: dict[str, Any], tmp_path: Path, signing_key: Any
) -> None:
    bucket = s3.new_bucket(public_read=True)  # a CDN origin: anyone may GET the objects
    base = f"{s3.endpoint}/{bucket}/models"
    store = {**s3.store_settings(bucket), "artifact_base_url": base}
    with server_a(tmp_path, shared, **store) as a:
        create_line(a)
        mv = add_version(services_of(a), version=1, status="champion", champion_release=True)
        register(a, "cam-2")
        target = a.get("/api/v1/devices/cam-2/target").json()
        versions = a.get(f"/api/v1/model-lines/{LINE}/versions/1/artifacts").json()
    assert target["artifact_url"] == f"{base}/{mv.sha256}"
    assert versions["model_url"] == f"{base}/{mv.sha256}"
    ref = signed_ref(target, signing_key)
    tail = httpx.get(target["artifact_url"], headers={"Range": f"bytes={ref.size - 10}-"})
    assert tail.status_code == 206 and len(tail.content) == 10  # the bucket answers Range
    model = httpx.get(target["artifact_url"]).content
    dest = download_like_a_device(target["artifact_url"], ref, tmp_path, signing_key, have=b"")
    assert dest.read_bytes() == model
    dest.unlink()
    download_like_a_device(target["artifact_url"], ref, tmp_path / "2", signing_key, have=model[:7])


def add_big_version(services: Services, data: bytes, version: int) -> str:
    sha, size = services.store.put_bytes(data)
    with services.sessions() as session:
        session.add(
            ModelVersion(
                line=LINE,
                version=version,
                status="candidate",
                sha256=sha,
                size=size,
                dataset_version=f"ds-{version}",
                trainer="sklearn-mlp",
                hyperparams={},
                metrics={},
                report={},
                sample_count=0,
            )
        )
        session.commit()
    return sha


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_route_streams_large_artifacts_with_range(
    backend: str, request: pytest.FixtureRequest, shared: dict[str, Any], tmp_path: Path
) -> None:
    store: dict[str, Any] = {}
    if backend == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        store = s3.store_settings(s3.new_bucket())
    data = os.urandom(CHUNK_BYTES + 5000)  # two chunks of the store's reads
    size = len(data)
    with server_a(tmp_path, shared, **store) as a:
        create_line(a)
        services = services_of(a)
        sha = add_big_version(services, data, version=1)
        app: Any = a.app
        app.state.artifact_cache = ArtifactCache(max_artifact=0)  # every artifact streams
        with LiveServer(a.app) as live, httpx.Client(base_url=live.url, timeout=60) as http:
            url = f"/api/v1/artifacts/{sha}"
            full = http.get(url)
            assert full.status_code == 200 and full.content == data
            assert full.headers["content-length"] == str(size)
            edge = CHUNK_BYTES
            cross = http.get(url, headers={"Range": f"bytes={edge - 10}-{edge + 9}"})
            assert cross.status_code == 206 and cross.content == data[edge - 10 : edge + 10]
            assert cross.headers["content-range"] == f"bytes {edge - 10}-{edge + 9}/{size}"
            assert cross.headers["content-length"] == "20"
            suffix = http.get(url, headers={"Range": "bytes=-7"})
            assert suffix.status_code == 206 and suffix.content == data[-7:]
            resume = http.get(url, headers={"Range": f"bytes={size - 100}-"})
            assert resume.content == data[-100:]
            beyond = http.get(url, headers={"Range": f"bytes={size}-"})
            assert beyond.status_code == 416
            assert beyond.headers["content-range"] == f"bytes */{size}"
            stale = http.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
            assert stale.status_code == 200 and stale.content == data
            services.store.delete(sha)  # known to the registry, gone from the store
            gone = http.get(url)
            assert gone.status_code == 404
            assert gone.json()["detail"] == f"no artifact {sha}"  # the store's URL stays inside


def test_training_on_an_s3_store_registers_into_the_bucket_and_warm_starts_from_it(
    s3: S3Server, shared: dict[str, Any], tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    settings = make_settings(
        tmp_path,
        shared["db_url"],
        data_dir=tmp_path / "a",
        signing_key_path=shared["signing_key_path"],
        trust_dir=shared["trust_dir"],
        training_python=fake_python(tmp_path, "pass"),
        **s3.store_settings(bucket),
    )
    with authed_client(create_app(settings)) as a:
        create_line(a, initial_training=True)
        jobs = services_of(a).jobs
        first = jobs.run_once()
        assert a.get(f"/api/v1/training-jobs/{first}").json()["status"] == "succeeded"
        v1 = a.get(f"/api/v1/model-lines/{LINE}/versions/1").json()
        key = f"models/{v1['sha256']}"
        model = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(model).hexdigest() == v1["sha256"]
        assert not (tmp_path / "a" / "artifacts").exists()  # nothing on this process's disk

        assert a.post("/api/v1/training-jobs", json={"model_line": LINE}).status_code == 201
        second = jobs.run_once()
        assert a.get(f"/api/v1/training-jobs/{second}").json()["status"] == "succeeded"
    spec = json.loads((settings.jobs_dir / str(second) / "spec.json").read_text())
    # The trainer's warm start: the worker's verified copy of the champion from the bucket, in
    # the job's own directory (a worker may run on another machine than any server).
    champion = Path(spec["champion"]["onnx_path"])
    assert champion.parent == (settings.jobs_dir / str(second)).resolve()
    assert champion.read_bytes() == model
