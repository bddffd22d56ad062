"""Offline operation against the real edgeloop server and a real Mosquitto, both taken away
for real during sample capture: after they return every captured sample is stored exactly once,
and where the spool bound was hit, exactly the dropped samples are missing (and counted)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest

from device_agent import Agent
from firmware_sim.services import ServerProcess
from tests.device_agent.agent_testkit import (
    CLASSES,
    FEATURES,
    LINE,
    FakeServer,
    make_config,
    make_manifest,
    make_model,
    make_target,
    wait_until,
)
from tests.device_agent.test_agent_e2e import Observer


@pytest.fixture
def server(broker, workdir) -> Iterator[ServerProcess]:
    srv = ServerProcess(workdir / "server", mqtt_port=broker.port).start()
    resp = httpx.post(
        f"{srv.url}/api/v1/model-lines",
        json={
            "name": LINE,
            "input_spec": {
                "name": "input",
                "shape": [-1, FEATURES],
                "dtype": "float32",
                "min": 0,
                "max": 16,
            },
            "labels": [str(i) for i in range(CLASSES)],
            "retrain_threshold": 10**9,  # no retraining in this test
            "initial_training": False,
        },
        headers=srv.headers,
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    yield srv
    srv.stop()


def stored(srv: ServerProcess, device_id: str) -> tuple[int, int]:
    """(rows, distinct sample ids) the server stored for a device."""
    with sqlite3.connect(srv.data_dir / "edgeloop.db") as db:
        row = db.execute(
            "SELECT count(*), count(DISTINCT sample_id) FROM samples WHERE device_id = ?",
            (device_id,),
        ).fetchone()
    return int(row[0]), int(row[1])


def uploaded_is(n: int, st: dict[str, Any]) -> bool:
    return bool(st["spool"]["uploaded"] == n)


def wait_for(agent: Agent, pred: Callable[[dict[str, Any]], bool], timeout: float = 30) -> None:
    wait_until(lambda: pred(agent.status()), timeout)


def capture(agent: Agent, n: int, rng: np.random.Generator) -> int:
    """``n`` predictions, each labelled wrong: every one is captured."""
    got = 0
    for _ in range(n):
        p = agent.predict(rng.uniform(0, 16, FEATURES).astype(np.float32))
        got += agent.feedback(p.prediction_id, (p.label + 1) % CLASSES)
    return got


def test_server_and_broker_outage_loses_and_duplicates_nothing(
    broker, server: ServerProcess, fake_server: FakeServer, tmp_path, signing_key
) -> None:
    m1 = make_model(1)
    target = make_target(
        make_manifest(m1, release=1, model_version=1), signing_key, fake_server.add("m1", m1)
    )
    observer = Observer(broker.host, broker.port)
    agents: dict[str, Agent] = {}
    fleet_token = server.enrollment_token(max_uses=2)
    for device_id, spool_bytes in (("roomy", 64 << 20), ("tight", 8000)):
        observer.publish_target(device_id, target.to_json())
        cfg = make_config(
            tmp_path / device_id,
            signing_key,
            device_id=device_id,
            server_url=server.url,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            upload_batch_max=5,
            upload_interval_s=0.1,
            upload_backoff_cap_s=0.5,
            spool_max_bytes=spool_bytes,
            http_timeout_s=2.0,
            bootstrap_token=fleet_token,
        )
        agents[device_id] = Agent(cfg)
    observer.close()
    rng = np.random.default_rng(3)
    captured = dict.fromkeys(agents, 0)
    try:
        for a in agents.values():
            a.start()
            assert a.wait_ready(60)
            wait_for(a, lambda st: st["registered"])
            captured[a.config.device_id] += capture(a, 10, rng)
        for d, a in agents.items():
            wait_for(a, partial(uploaded_is, captured[d]), 60)

        server.stop()
        broker.stop()
        for a in agents.values():
            wait_for(a, lambda st: not st["mqtt_connected"])
            captured[a.config.device_id] += capture(a, 60, rng)
        for a in agents.values():  # reports pile up on disk while the broker is away
            wait_for(a, lambda st: st["outbox"]["pending"] > 0)
        assert agents["roomy"].status()["spool"]["pending"] == 60
        assert agents["roomy"].status()["spool"]["dropped"] == 0
        wait_until(lambda: agents["tight"].status()["spool"]["dropped"] > 0)

        broker.start()
        server.start()
        for a in agents.values():
            wait_for(a, lambda st: st["spool"]["pending"] == 0, 90)
            wait_for(a, lambda st: st["outbox"]["pending"] == 0, 60)
        summary = {}
        for d, a in agents.items():
            st = a.status()["spool"]
            rows, distinct = stored(server, d)
            summary[d] = {"captured": captured[d], "stored": rows, **st}
            assert rows == distinct, f"{d}: a sample was stored twice"
            assert st["rejected"] == 0
            assert rows == st["uploaded"] == captured[d] - st["dropped"], summary[d]
            assert st["sent"] >= rows  # what the transport sent, resends included
        assert summary["roomy"]["dropped"] == 0 and summary["roomy"]["stored"] == 70
        assert summary["tight"]["dropped"] > 0
        print(summary)
    finally:
        for a in agents.values():
            a.stop()
