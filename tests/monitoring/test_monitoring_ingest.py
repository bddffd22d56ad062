"""Monitor summaries through a real Mosquitto into the database (SQLite and PostgreSQL): a good
one is stored; hostile ones are refused with their reason and listed with the device's refused
reports; an unknown device's is counted and dropped; nothing stops the writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from contract import Topics
from contract.messages import MAX_MESSAGE_BYTES
from server.db.monitoring import MonitorSummaryRow
from server.db.reports import RefusedReport
from server.main import create_app
from tests.authkit import enroll
from tests.monitoring.conftest import Trained, View
from tests.monitoring.monitoring_kit import LINE, register_model, summary
from tests.server.conftest import (
    authed_client,
    create_line,
    fake_onnx_bytes,
    services_of,
    wait_for,
)
from tests.server.fake_trainer import build_onnx
from tests.server.test_mqtt_bridge import bridge_settings

TOPICS = Topics()


def test_summaries_through_the_broker_are_stored_or_refused_with_a_reason(
    broker: Any,
    tmp_path: Path,
    db_url: str,
    signing_key: Any,
    trained: Trained,
    views: dict[float, View],
) -> None:
    settings = bridge_settings(tmp_path, db_url, signing_key, broker, enable_ingest_writer=True)
    with authed_client(create_app(settings)) as client:
        services = services_of(client)
        create_line(client)
        register_model(services, trained.onnx, version=1)
        register_model(services, build_onnx(2), version=2, champion=False)  # no reference
        register_model(services, fake_onnx_bytes(3), version=3, champion=False)  # not ONNX
        create_line(client, name="other")
        for d in ("cam-1", "cam-2"):
            enroll(client, d, LINE, groups=["hall-1"])
        assert services.bridge is not None
        wait_for(services.bridge.connected.is_set, what="bridge connected")

        rng = np.random.default_rng(1)
        good = summary(trained.reference, views[0.0], "cam-1", 50, rng)
        doc = good.to_dict()

        def variant(**changes: Any) -> bytes:
            return json.dumps({**doc, **changes}).encode()

        conf = doc["counts"]["confidence"]
        # (payload on cam-1's monitor topic, a fragment of the reason it must be refused with)
        hostile = [
            (b"\xff not json", "not UTF-8"),
            (b'{"device_id": "cam-1"', "not JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (variant(samples=51), "add up to 50, not 51"),
            (variant(device_id="cam-2"), "does not match the topic"),
            (variant(counts={**doc["counts"], "wobble": [1, 49]}), "not a known signal"),
            (variant(counts={**doc["counts"], "confidence": [50, 0, 0]}), "3 bins, the reference"),
            (variant(model_version=99), "has no version 99"),
            (variant(model_version=2), "carries no monitoring reference"),
            (variant(model_version=3), "its model file cannot be read"),
            (variant(model_version=2**40), "model_version is out of range"),
            (variant(model_line="other"), "is not the device's line"),
            (variant(start=doc["end"] + 1), "start <= end"),
            (variant(counts={"confidence": [-1, *conf[1:-1], conf[-1] + 1]}), "integers in 0"),
            (b"[" * 40 + b"]" * 40, "nests 40 levels deep"),
            (b"x" * (MAX_MESSAGE_BYTES + 1), f"limit {MAX_MESSAGE_BYTES}"),
        ]
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        try:
            infos = [pub.publish(TOPICS.monitor("cam-1"), p, qos=1) for p, _ in hostile]
            ghost = summary(trained.reference, views[0.0], "ghost", 50, rng)
            infos.append(pub.publish(TOPICS.monitor("ghost"), ghost.to_json(), qos=1))
            infos.append(pub.publish(TOPICS.monitor("cam-1"), good.to_json(), qos=1))
            for info in infos:
                info.wait_for_publish(10)
        finally:
            pub.loop_stop()
            pub.disconnect()

        def stored() -> list[Any]:
            with services.sessions() as s:
                return list(s.scalars(select(MonitorSummaryRow)))

        wait_for(lambda: len(stored()) == 1, what="the good summary stored")
        stats = services.ingest.stats
        wait_for(lambda: stats.received == len(hostile) + 2, what="every message taken")
        (row,) = stored()
        assert (row.device_id, row.model_line, row.model_version, row.samples) == (
            "cam-1",
            LINE,
            1,
            50,
        )
        assert row.counts == {name: list(c) for name, c in good.counts}
        assert row.period_end - row.period_start == 30.0
        assert stats.monitor_written == 1 and stats.unknown_device == 1
        assert stats.invalid == len(hostile) and stats.failed_writes == 0
        assert services.ingest.running and services.bridge.stats.errors == 0

        # Each refusal is kept under cam-1 with its reason, and listed by the API.
        resp = client.get("/api/v1/devices/cam-1/refused", params={"limit": 50})
        assert resp.status_code == 200, resp.text
        refused = resp.json()
        assert {r["kind"] for r in refused} == {"monitor"}
        reasons = [r["reason"] for r in refused]
        for _, fragment in hostile:
            assert any(fragment in why for why in reasons), (fragment, reasons)
        assert len(refused) == len(hostile)
        oversize = next(r for r in refused if "limit" in r["reason"])
        assert oversize["size"] == MAX_MESSAGE_BYTES + 1 and len(oversize["excerpt"]) <= 512
        with services.sessions() as s:
            assert s.scalar(select(func.count()).select_from(RefusedReport)) == len(hostile)
            ghosts = s.scalar(
                select(func.count())
                .select_from(MonitorSummaryRow)
                .where(MonitorSummaryRow.device_id == "ghost")
            )
            assert ghosts == 0
