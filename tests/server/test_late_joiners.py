"""Devices that join late get the line's current target, over MQTT (retained) and over HTTP.

The rollout engine announces targets when a wave starts, a device is retried or a rollout rolls
back; a device that enrolls or registers after the rollout's last tick (or after it completed)
is in none of those announcements. These tests drive a rollout on a real Mosquitto and check
that such a device's retained target topic holds the same target the HTTP fallback answers.
"""

from __future__ import annotations

import base64
import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import select

from contract import TargetMessage, Topics
from server.db import fleet
from server.db.rollouts import RolloutDevice
from server.main import create_app
from server.rollout.targets import resolve_target
from server.services import Services
from tests.server.conftest import (
    add_version,
    authed_client,
    create_line,
    register,
    services_of,
    wait_for,
)
from tests.server.test_mqtt_bridge import bridge_settings
from tests.server.test_rollout_engine import install, metrics

pytestmark = pytest.mark.slow

FLEET = [f"cam-{i:02d}" for i in range(10)]
MQTT_WAIT_S = 30.0  # seconds: only bounds the wait for the bridge and the broker


def retained_target(broker: Any, device: str) -> dict[str, Any] | None:
    """What a device subscribing now would get on its target topic (None: nothing retained)."""
    got: list[bytes] = []
    arrived = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        arrived.set()

    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    try:
        sub.subscribe(Topics().target(device), qos=1)
        arrived.wait(1.0)  # a retained message comes right after SUBACK
    finally:
        sub.loop_stop()
        sub.disconnect()
    return TargetMessage.from_dict(got[-1]).to_dict() if got else None


def release_of(target: dict[str, Any]) -> int:
    return int(json.loads(base64.b64decode(target["envelope"]["payload"]))["release"])


def http_target(client: Any, device: str) -> dict[str, Any]:
    resp = client.get(f"/api/v1/devices/{device}/target")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def server_target(services: Services, device: str) -> dict[str, Any]:
    """What the HTTP fallback answers, for a device with no credential (stored directly)."""
    with services.sessions() as s:
        return resolve_target(
            s,
            device_id=device,
            artifact_base=services.settings.artifact_url_base,
            roots=services.signer.roots,
        ).to_dict()


def assert_converges(
    client: Any, broker: Any, device: str, release: int, *, enrolled: bool = True
) -> dict[str, Any]:
    """The HTTP fallback answers ``release`` and the retained MQTT target becomes the same."""
    expected = (
        http_target(client, device) if enrolled else server_target(services_of(client), device)
    )
    assert release_of(expected) == release, expected
    wait_for(
        lambda: retained_target(broker, device) == expected,
        timeout=MQTT_WAIT_S,
        what=f"{device}'s retained target == its HTTP target (release {release})",
    )
    return expected


def released(services: Services, rid: int) -> list[str]:
    with services.sessions() as s:
        return sorted(
            s.scalars(
                select(RolloutDevice.device_id).where(
                    RolloutDevice.rollout_id == rid, RolloutDevice.notified_at.is_not(None)
                )
            ).all()
        )


def test_devices_joining_during_and_after_a_rollout_get_the_current_target(
    broker, tmp_path: Path, db_url: str, signing_key, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = bridge_settings(tmp_path, db_url, signing_key, broker, mqtt_reconnect_max_s=1)
    with authed_client(create_app(settings)) as client:
        services = services_of(client)
        assert services.bridge is not None
        create_line(client)
        for d in FLEET:
            register(client, d)
        add_version(services, version=1, status="champion", champion_release=True)
        add_version(services, version=2, status="candidate")
        wait_for(services.bridge.connected.is_set, timeout=MQTT_WAIT_S, what="bridge connected")
        rid = client.post(
            "/api/v1/rollouts",
            json={"model_line": "digits", "model_version": 2, "canary_percent": 20},
        ).json()["id"]
        assert client.post(f"/api/v1/rollouts/{rid}/approve", json={}).status_code == 200
        canary = released(services, rid)
        assert len(canary) == 2

        # Joins while the canary wave runs, before any tick takes it in: the line's current
        # release (1) at once; the next tick places it in its wave and, if that wave started,
        # sends it the rollout's release, over MQTT too.
        register(client, "during-wave")
        assert_converges(client, broker, "during-wave", 1)
        now = services.clock()
        install(services, canary, rid, 2)
        services.ingest.drain()
        services.rollouts.tick(now + timedelta(seconds=1))
        in_canary = "during-wave" in released(services, rid)
        assert_converges(client, broker, "during-wave", 2 if in_canary else 1)

        # Good canary metrics: the rest wave starts, "during-wave" included.
        rest = sorted(set(FLEET) - set(canary))
        for d in canary:
            metrics(services, d, 2, labelled=40, correct=37, rollout_id=rid)
        for d in rest:
            metrics(services, d, 1, labelled=100, correct=92)
        services.ingest.drain()
        adv = services.rollouts.tick(now + timedelta(seconds=2))[rid]
        assert adv.action.value == "advance", adv
        assert "during-wave" in released(services, rid)
        assert_converges(client, broker, "during-wave", 2)

        # Registered after the completing tick took members in, before the rollout completed
        # (no announcement of the engine's covers it): the completion announces the new
        # current release to it.
        install(services, sorted(set(released(services, rid)) - set(canary)), rid, 2)
        services.ingest.drain()
        engine = services.rollouts
        advance = engine._advance

        def register_then_advance(*args: Any, **kwargs: Any) -> None:
            # The race: the device's row commits after this tick took members in, before the
            # rollout completes (stored directly: its own announcement would hide the gap).
            with services.sessions() as s:
                fleet.register_device(
                    s,
                    device_id="between-ticks",
                    model_line="digits",
                    hardware=None,
                    groups=[],
                    agent_version=None,
                    now=services.clock(),
                )
            advance(*args, **kwargs)

        monkeypatch.setattr(engine, "_advance", register_then_advance)
        done = engine.tick(now + timedelta(seconds=3))[rid]
        monkeypatch.undo()
        assert done.action.value == "advance", done
        assert client.get(f"/api/v1/rollouts/{rid}").json()["state"] == "completed"
        between = assert_converges(client, broker, "between-ticks", 2, enrolled=False)
        assert between["rollout_id"] is None

        # Enrolls after the rollout completed: no tick will ever look at it again.
        register(client, "after-rollout")
        after = assert_converges(client, broker, "after-rollout", 2)
        assert after["rollout_id"] is None
        # The fleet that took part keeps the target the rollout sent it.
        for d in FLEET:
            assert release_of(http_target(client, d)) == 2
