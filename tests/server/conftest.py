"""Fixtures for server tests: settings on a per-test data dir, an app without threads, seeds."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from contract import encode_input
from server.core.config import Settings
from server.db.registry import ModelLine, ModelVersion
from server.main import create_app
from server.release.signing import sign_release
from server.services import DIGITS_INPUT_SPEC, DIGITS_LABELS, Services
from tests.authkit import FleetAuth, enroll
from tests.conftest import TEST_ADMIN_TOKEN, upgraded, write_key_pair
from training.data import digits_pools

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
LINE = "digits"


def make_settings(tmp_path: Path, db_url: str, **overrides: Any) -> Settings:
    """Settings for a test app: no background threads unless a test asks for them, on a database
    upgraded to the current schema as an operator does (``edgeloop db upgrade``)."""
    values: dict[str, Any] = dict(
        database_url=upgraded(db_url),
        data_dir=tmp_path / "var",
        enable_mqtt=False,
        enable_rollout_engine=False,
        enable_job_runner=False,
        enable_ingest_writer=False,
        enable_monitor_evaluator=False,
        enable_webhook_sender=False,
        enable_capture_publisher=False,
        canary_min_soak_s=0,
        min_labelled=50,
        admin_token=TEST_ADMIN_TOKEN,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, db_url: str, signing_key) -> Settings:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    return make_settings(tmp_path, db_url, signing_key_path=priv)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as c:
        # The admin operator by default; each enrolled device's own credential on its routes.
        c.auth = FleetAuth(TEST_ADMIN_TOKEN)
        yield c


def authed_client(app: Any) -> TestClient:
    """A TestClient that acts as the admin operator, and as each device it enrolled."""
    client = TestClient(app)
    client.auth = FleetAuth(TEST_ADMIN_TOKEN)
    return client


def services_of(client: TestClient) -> Services:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    return services


def create_line(client: TestClient, name: str = LINE, **kw: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "trainer": "sklearn-mlp",
        "input_spec": DIGITS_INPUT_SPEC,
        "labels": DIGITS_LABELS,
        "initial_training": False,
        **kw,
    }
    resp = client.post("/api/v1/model-lines", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def register(client: TestClient, device_id: str, line: str = LINE) -> dict[str, Any]:
    """Enroll the device (its credential goes to the client's FleetAuth), or refresh it."""
    return enroll(client, device_id, line)


def fake_onnx_bytes(seed: int) -> bytes:
    """Distinct bytes per version (the store only hashes them; devices are simulated)."""
    return hashlib.sha256(f"model-{seed}".encode()).digest() * 64


def add_version(
    services: Services,
    *,
    line: str = LINE,
    version: int,
    status: str,
    champion_release: bool = False,
    golden: float = 0.9,
    onnx: bytes | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Register a trained version directly (as the job runner would), optionally as the
    champion with its factory release. ``onnx``: the model's bytes (default: distinct fake
    bytes); ``metrics``: the version's metrics (default: the challenger's golden accuracy)."""
    data = onnx if onnx is not None else fake_onnx_bytes(version)
    sha, size = services.store.put_bytes(data)
    with services.sessions() as session:
        ml = session.get(ModelLine, line)
        assert ml is not None
        mv = ModelVersion(
            line=line,
            version=version,
            status=status,
            sha256=sha,
            size=size,
            parent_version=ml.champion_version,
            dataset_version=f"ds-{version}",
            trainer="sklearn-mlp",
            hyperparams={},
            metrics=metrics if metrics is not None else {"challenger": {"golden_accuracy": golden}},
            report={},
            sample_count=0,
        )
        session.add(mv)
        session.flush()
        if champion_release:
            rel = sign_release(
                session,
                signer=services.signer,
                line_name=line,
                model_version=version,
                now=services.clock(),
                ttl_days=30,
            )
            ml.champion_version = version
            ml.current_release = rel.release
        session.commit()
        return mv


def sample(
    device_id: str,
    *,
    sample_id: str,
    line: str = LINE,
    x: np.ndarray | None = None,
    true_label: int = 3,
    predicted_label: int = 5,
    confidence: float = 0.4,
) -> dict:
    if x is None:
        # A real digit of the true label (label screening quarantines noise that neither the
        # champion nor the neighbours call so), with a little noise so the content is distinct
        # per id: the same input under two ids is refused (content hash).
        seed = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big")
        rng = np.random.default_rng(seed)
        pool = digits_pools().field
        of_label = np.flatnonzero(pool.y == true_label)
        image = pool.X[rng.choice(of_label)] if of_label.size else rng.random(64)
        x = np.clip(image + rng.normal(0, 0.02, 64), 0.0, 1.0).astype(np.float32)
    return {
        "sample_id": sample_id,
        "device_id": device_id,
        "model_line": line,
        "model_version": 1,
        "input_b64": encode_input(x),
        "true_label": true_label,
        "predicted_label": predicted_label,
        "confidence": confidence,
        "captured_at": 1_700_000_000.0,
    }


def wait_for(cond: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``cond`` until truthy (generous deadline; never a timed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def fake_python(tmp_path: Path, mode: str) -> str:
    """A stand-in for ``training_python``: runs fake_trainer.py, ignoring ``-m training``."""
    script = tmp_path / f"fake-python-{mode}"
    script.write_text(
        f'#!/bin/sh\nshift 2\nexec {sys.executable} {FAKE_TRAINER} --mode {mode} "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return os.fspath(script)


def utc(ts: float) -> datetime:
    from datetime import UTC

    return datetime.fromtimestamp(ts, UTC)
