"""Sample ingest through the HTTP API: samples per second, on SQLite and on PostgreSQL.

Starts the real server (uvicorn in a subprocess, as an operator runs it), registers devices on a
digits line whose retraining threshold is never reached, and posts ``--samples`` distinct samples
in batches of ``--batch`` (every one fully validated: shape, range, labels, id and content-hash
duplicates). Same-run baselines: the same server fed one sample per request, and a raw bulk
INSERT of the same rows straight into the database (no HTTP, no validation), so the report shows
what the API costs over the storage it cannot beat.

    .venv/bin/python -m benchmarks.ingest_bench [--samples 20000] [--batch 500] [--pg URL]

Target: at least 2,000 samples/s in batches, on each backend. Exit status 1 if one is missed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy

from contract import encode_input
from firmware_sim.services import ServerProcess

TARGET_SPS = 2000.0  # samples per second through the API, in batches
DEVICES = 20
SINGLE_SAMPLES = 300  # samples sent one per request for the baseline
CLIENTS = 2  # concurrent HTTP clients (devices upload in parallel)
DIGITS_SPEC = {"name": "input", "shape": [-1, 64], "dtype": "float32", "min": 0.0, "max": 1.0}


def make_records(n: int, prefix: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    X = rng.random((n, 64), dtype=np.float32)
    return [
        {
            "sample_id": f"{prefix}{i:07d}",
            "device_id": f"bench-{i % DEVICES:03d}",
            "model_line": "digits",
            "model_version": 1,
            "input_b64": encode_input(X[i]),
            "true_label": int(i % 10),
            "predicted_label": int((i + 1) % 10),
            "confidence": 0.4,
            "captured_at": 1_700_000_000.0,
        }
        for i in range(n)
    ]


def setup(server: ServerProcess) -> dict[str, dict[str, str]]:
    """The line and the devices; returns each device's Authorization headers."""
    api = f"{server.url}/api/v1"
    with httpx.Client(timeout=30, headers=server.headers) as c:
        r = c.post(
            f"{api}/model-lines",
            json={
                "name": "digits",
                "input_spec": DIGITS_SPEC,
                "labels": [str(i) for i in range(10)],
                "retrain_threshold": 10**9,
                "initial_training": False,
            },
        )
        r.raise_for_status()
    token = server.enrollment_token(max_uses=DEVICES)
    return {
        f"bench-{d:03d}": {
            "Authorization": f"Bearer {server.enroll(f'bench-{d:03d}', 'digits', token=token)}"
        }
        for d in range(DEVICES)
    }


def bodies_of(
    records: list[dict], batch: int, creds: dict[str, dict[str, str]]
) -> list[tuple[bytes, dict[str, str]]]:
    """Pre-encoded batches, each of one device's records (a device uploads only its own)."""
    by_device: dict[str, list[dict]] = {}
    for r in records:
        by_device.setdefault(r["device_id"], []).append(r)
    return [
        (json.dumps({"samples": rs[i : i + batch]}).encode(), creds[d])
        for d, rs in by_device.items()
        for i in range(0, len(rs), batch)
    ]


def post_all(api: str, bodies: list[tuple[bytes, dict[str, str]]], clients: int) -> float:
    """POST every body (pre-encoded JSON); returns wall seconds. Every sample must be accepted."""

    def run(chunk: list[tuple[bytes, dict[str, str]]]) -> int:
        accepted = 0
        with httpx.Client(timeout=120) as c:
            for body, auth in chunk:
                headers = {"content-type": "application/json", **auth}
                r = c.post(f"{api}/samples", content=body, headers=headers)
                r.raise_for_status()
                accepted += r.json()["accepted"]
        return accepted

    chunks = [bodies[i::clients] for i in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, chunks))
    return time.perf_counter() - started


def raw_insert(db_url: str, records: list[dict]) -> float:
    """Bulk INSERT of the same rows in one transaction: the storage floor."""
    if db_url.startswith("sqlite"):
        engine = sqlalchemy.create_engine(db_url)
    else:
        engine = sqlalchemy.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    from server.db.sample_store import Sample

    now = datetime.now(UTC).replace(tzinfo=None)
    rows = []
    for r in records:
        raw = np.frombuffer(base64.b64decode(r["input_b64"]), "<f4").tobytes()
        rows.append(
            {
                "sample_id": r["sample_id"],
                "device_id": r["device_id"],
                "model_line": "digits",
                "model_version": 1,
                "input": raw,
                "true_label": r["true_label"],
                "predicted_label": r["predicted_label"],
                "confidence": r["confidence"],
                "captured_at": r["captured_at"],
                "received_at": now,
                "content_sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sqlalchemy.insert(Sample), rows)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def run_backend(name: str, db_url: str, workdir: Path, n: int, batch: int) -> dict[str, float]:
    server = ServerProcess(
        workdir / name,
        mqtt_port=1,
        env={
            "EDGELOOP_DATABASE_URL": db_url,
            "EDGELOOP_MQTT_ENABLED": "false",
            "EDGELOOP_ENABLE_JOB_RUNNER": "false",
            "EDGELOOP_ENABLE_ROLLOUT_ENGINE": "false",
        },
    ).start()
    try:
        api = f"{server.url}/api/v1"
        creds = setup(server)
        records = make_records(n, "b-", seed=1)
        bodies = bodies_of(records, batch, creds)
        # Warm-up (first request pays for imports and connection setup), not counted.
        post_all(api, bodies_of(make_records(50, "w-", 9), 50, creds), 1)
        batched_s = post_all(api, bodies, CLIENTS)
        singles = make_records(SINGLE_SAMPLES, "s-", seed=2)
        single_s = post_all(api, bodies_of(singles, 1, creds), CLIENTS)
        count = httpx.get(f"{api}/model-lines/digits", headers=server.headers, timeout=30).json()[
            "new_samples"
        ]
        assert count == n + 50 + SINGLE_SAMPLES, count
    finally:
        server.stop()
    raw_s = raw_insert(db_url, make_records(n, "r-", seed=3))
    return {
        "batched_sps": n / batched_s,
        "single_sps": SINGLE_SAMPLES / single_s,
        "raw_sps": n / raw_s,
    }


def fresh_pg_db(base_url: str) -> tuple[str, sqlalchemy.Engine, str]:
    admin = sqlalchemy.create_engine(base_url, isolation_level="AUTOCOMMIT")
    name = f"edgeloop_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return f"{base_url.rpartition('/')[0]}/{name}", admin, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument(
        "--pg",
        default=os.environ.get(
            "EDGELOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="admin URL of a PostgreSQL server ('' to skip PostgreSQL)",
    )
    a = p.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeloop-ingest-") as tmp:
        root = Path(tmp)
        results["sqlite"] = run_backend(
            "sqlite", f"sqlite:///{root}/bench.db", root, a.samples, a.batch
        )
        if a.pg:
            url, admin, name = fresh_pg_db(a.pg)
            try:
                results["postgresql"] = run_backend("postgresql", url, root, a.samples, a.batch)
            finally:
                with admin.connect() as conn:
                    conn.exec_driver_sql(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                        (name,),
                    )
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
                admin.dispose()
    ok = True
    print(
        f"\nSample ingest through POST /api/v1/samples ({a.samples} samples, batches of "
        f"{a.batch}, {CLIENTS} clients; {os.cpu_count()} CPU cores)"
    )
    print(
        f"{'backend':<11} {'batched/s':>10} {'1-per-req/s':>12} {'raw INSERT/s':>13} "
        f"{'vs 1/req':>9} {'vs raw':>7} {'target':>7}  result"
    )
    for backend, r in results.items():
        passed = r["batched_sps"] >= TARGET_SPS
        ok &= passed
        print(
            f"{backend:<11} {r['batched_sps']:>10.0f} {r['single_sps']:>12.0f} "
            f"{r['raw_sps']:>13.0f} {r['batched_sps'] / r['single_sps']:>8.1f}x "
            f"{r['batched_sps'] / r['raw_sps']:>6.2f}x {TARGET_SPS:>7.0f}  "
            f"{'PASS' if passed else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
