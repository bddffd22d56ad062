"""10,000 devices report at once: how fast does one server process absorb the burst?

Registers N devices, then has them all publish a status report and a metrics report over real
MQTT (Mosquitto) as fast as a few publisher connections can, and measures how long one server
process takes to write every report to the database. The same burst is run twice in the same run:
with the server's batched ingest (the default: up to 500 reports per transaction) and with one
transaction per report (the baseline), on SQLite and on PostgreSQL.

    .venv/bin/python -m benchmarks.fleet_ingest_bench [--devices 10000] [--pg URL]

Target: the batched server writes a 10,000-device burst (20,000 reports) in under 60 s, i.e. a
fleet that reports every minute is sustainable on one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import sqlalchemy

from contract import DeviceState, MetricsReport, StatusReport, Topics
from firmware_sim.services import Mosquitto, ServerProcess

TARGET_S = 60.0  # seconds to absorb one report of each kind from every device
PUBLISHERS = 4  # MQTT connections the devices' reports are spread over


def register_all(server: ServerProcess, n: int) -> list[str]:
    """Enroll ``n`` devices with one multi-use bootstrap token."""
    ids = [f"bench-{i:05d}" for i in range(n)]
    token = server.enrollment_token(max_uses=n)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda d: server.enroll(d, "digits", token=token), ids))
    return ids


def burst(host: str, port: int, ids: list[str]) -> float:
    """Publish one status + one metrics report per device; returns seconds spent publishing."""
    topics = Topics()
    now = time.time()
    chunks = [ids[i::PUBLISHERS] for i in range(PUBLISHERS)]

    def publish(chunk: list[str]) -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}")
        c.max_inflight_messages_set(1000)
        c.connect(host, port)
        c.loop_start()
        infos = []
        for d in chunk:
            s = StatusReport(d, now, DeviceState.COMMITTED, "digits", 1, 1)
            m = MetricsReport(d, now, "digits", 1, 60.0, 240, 0, 240, 230, 0.2, 0.5)
            infos.append(c.publish(topics.status(d), s.to_json(), qos=1))
            infos.append(c.publish(topics.metrics(d), m.to_json(), qos=1))
        for info in infos:
            info.wait_for_publish(120)
        c.loop_stop()
        c.disconnect()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=publish, args=(ch,)) for ch in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_case(label: str, db_url: str, n: int, batch_max: int, root: Path) -> dict[str, float]:
    broker = Mosquitto(root / f"mqtt-{label}").start()
    server = ServerProcess(
        root / f"server-{label}",
        mqtt_port=broker.port,
        env={
            "EDGELOOP_DATABASE_URL": db_url,
            "EDGELOOP_INGEST_BATCH_MAX": str(batch_max),
            "EDGELOOP_ENABLE_JOB_RUNNER": "false",
            "EDGELOOP_ENABLE_ROLLOUT_ENGINE": "false",
        },
    ).start()
    try:
        api = f"{server.url}/api/v1"
        r = httpx.post(
            f"{api}/model-lines",
            json={
                "name": "digits",
                "trainer": "sklearn-mlp",
                "initial_training": False,
                "input_spec": {
                    "name": "input",
                    "shape": [-1, 64],
                    "dtype": "float32",
                    "min": 0.0,
                    "max": 1.0,
                },
                "labels": [str(i) for i in range(10)],
            },
            headers=server.headers,
        )
        r.raise_for_status()
        t_reg = time.perf_counter()
        ids = register_all(server, n)
        reg_s = time.perf_counter() - t_reg
        deadline = time.monotonic() + 120
        while not httpx.get(f"{server.url}/healthz").json()["mqtt"]["connected"]:
            if time.monotonic() > deadline:
                raise TimeoutError("server never connected to the broker")
            time.sleep(0.2)
        t0 = time.perf_counter()
        pub_s = burst(broker.host, broker.port, ids)
        want = 2 * n
        while True:
            ingest = httpx.get(f"{server.url}/healthz").json()["ingest"]
            written = ingest["status_written"] + ingest["metrics_written"]
            if written >= want:
                break
            if time.perf_counter() - t0 > 900:
                raise TimeoutError(f"{label}: {written}/{want} written after 900 s")
            time.sleep(0.1)
        total_s = time.perf_counter() - t0
        return {
            "register_s": reg_s,
            "publish_s": pub_s,
            "absorb_s": total_s,
            "reports_per_s": want / total_s,
            "batches": ingest["batches"],
        }
    finally:
        server.stop()
        broker.stop()


def fresh_pg_db(base_url: str) -> tuple[str, sqlalchemy.Engine, str]:
    admin = sqlalchemy.create_engine(base_url, isolation_level="AUTOCOMMIT")
    name = f"edgeloop_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return f"{base_url.rpartition('/')[0]}/{name}", admin, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument(
        "--pg",
        default=os.environ.get(
            "EDGELOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    p.add_argument(
        "--baseline-devices",
        type=int,
        default=2_000,
        help="devices in the one-transaction-per-report baseline (it is slow)",
    )
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="edgeloop-bench-"))
    rows = []
    ok = True
    for db in ("sqlite", "postgresql"):
        for mode, batch, n in (("batched", 500, a.devices), ("per-report", 1, a.baseline_devices)):
            cleanup = None
            if db == "sqlite":
                url = f"sqlite:///{root}/{db}-{mode}.db"
            else:
                url, admin, name = fresh_pg_db(a.pg)
                cleanup = (admin, name)
            try:
                r = run_case(f"{db}-{mode}", url, n, batch, root)
            finally:
                if cleanup:
                    admin, name = cleanup
                    with admin.connect() as conn:
                        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            rows.append((db, mode, n, r))
            print(
                f"{db:<10} {mode:<10} devices {n:>6}: published {r['publish_s']:6.1f} s, "
                f"all written {r['absorb_s']:6.1f} s = {r['reports_per_s']:8.0f} reports/s "
                f"({r['batches']} transactions)",
                flush=True,
            )
    print("\nresult")
    for db in ("sqlite", "postgresql"):
        batched = next(r for d, m, _, r in rows if d == db and m == "batched")
        base = next(r for d, m, _, r in rows if d == db and m == "per-report")
        n = a.devices
        verdict = "PASS" if batched["absorb_s"] < TARGET_S * n / 10_000 else "FAIL"
        ok &= verdict == "PASS"
        print(
            f"  {db:<10} {n} devices absorbed in {batched['absorb_s']:.1f} s "
            f"(target < {TARGET_S * n / 10_000:.0f} s) {verdict}; batched ingest is "
            f"{batched['reports_per_s'] / base['reports_per_s']:.1f}x the per-report baseline"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
