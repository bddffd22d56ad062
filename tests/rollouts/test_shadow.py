"""Shadow waves on a real fleet: real agents, real Mosquitto, the server process.

- A good challenger runs in shadow beside the champion on the first wave's devices: they serve
  only the champion's answers and report agreement and both accuracies; the server records
  them, the shadow gate holds, and the serve waves take the new model to the whole fleet.
- A challenger trained on flipped labels is stopped by the shadow gate: the rollout is rolled
  back, the shadow devices drop it, and no device ever serves it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from firmware_sim.fleet import SimDevice
from tests.conftest import poll
from tests.rollouts.conftest import World

pytestmark = pytest.mark.slow

SHADOW = {"percent": 25, "name": "shadow", "kind": "shadow"}


def in_wave(world: World, rid: int, wave: int) -> list[str]:
    return [r["device_id"] for r in world.get(f"/rollouts/{rid}/devices", wave=wave)]


def sim_devices(world: World) -> dict[str, SimDevice]:
    return {d.device_id: d for f in world.fleets for d in f.devices}


def deployments_seen(world: World, device: str, version: int) -> set[str]:
    """The signed ``deployment`` of every target the broker delivered to ``device``."""
    out: set[str] = set()
    with world.recorder.lock:
        releases = [rel for rel, v, _ in world.recorder.seen.get(device, []) if v == version]
    for rel in set(releases):
        envelope = world.get(f"/model-lines/digits/releases/{rel}")["envelope"]
        out.add(json.loads(base64.b64decode(envelope["payload"])).get("deployment", "serve"))
    return out


def shadow_status(dev: SimDevice) -> dict[str, Any] | None:
    return dev.agent.status()["shadow"]


def test_good_challenger_in_shadow_then_serve_waves_to_the_whole_fleet(world: World) -> None:
    world.start_fleet(8)
    champion = world.get("/model-lines/digits")["champion_version"]
    good = world.train()
    plan = [SHADOW, {"percent": 50, "name": "canary", "manual_gate": True}, {"percent": 100}]
    rid = world.create_rollout(good, plan)
    world.post(f"/rollouts/{rid}/approve", {})
    shadow = in_wave(world, rid, 1)
    assert len(shadow) == 2
    devices = sim_devices(world)

    # The shadow gate holds; the canary waits for an approver, so the shadow wave can be
    # inspected exactly as it ended.
    r = world.wait_rollout(rid, ("awaiting_gate", "rolled_back", "paused"), timeout=150)
    assert r["state"] == "awaiting_gate" and r["stage"] == 0, r
    assert "shadow gates hold" in r["reason"], r["reason"]
    figures = r["gates"]["quality"]["shadow"]
    assert figures["labelled"] >= 40 and figures["compared"] >= figures["labelled"]
    # Both accuracies on the very same labelled inputs, and how often the two agreed.
    assert figures["challenger_accuracy"] > 0.8, figures
    assert figures["challenger_accuracy"] >= figures["champion_accuracy"] - 0.1, figures
    assert 0.5 < figures["agreement"] <= 1, figures
    for d in shadow:
        status = shadow_status(devices[d])
        assert status is not None and status["model_version"] == good, status
        assert status["compared"] > 0
        # Every answer a shadow device served came from the champion.
        assert set(devices[d].served) == {champion}, devices[d].served
        assert world.get(f"/rollouts/{rid}/devices/{d}")["state"] == "shadow"
        assert deployments_seen(world, d, good) == {"shadow"}
    for d in set(devices) - set(shadow):
        assert world.recorder.count(d, good) == 0  # nobody else heard of the challenger yet
        assert set(devices[d].served) == {champion}

    world.post(f"/rollouts/{rid}/approve", {})
    r = world.wait_rollout(rid, ("completed", "rolled_back", "paused"), timeout=170)
    assert r["state"] == "completed", r
    poll(
        "every device on the new model",
        lambda: all(v == good for v in world.serving().values()),
        timeout=60,
    )
    for d in shadow:
        assert shadow_status(devices[d]) is None  # the serve release ended the shadow run
        assert deployments_seen(world, d, good) == {"shadow", "serve"}
    events = world.get(f"/rollouts/{rid}/events")
    starts = [e["wave"] for e in events if e["state"] in ("approved", "wave_started")]
    assert starts == [1, 2, 3]


def test_flipped_label_challenger_is_stopped_in_shadow_and_never_served(world: World) -> None:
    world.start_fleet(8)
    champion = world.get("/model-lines/digits")["champion_version"]
    bad = world.train(flipped=True)
    rid = world.create_rollout(bad, [SHADOW, {"percent": 100}])
    world.post(f"/rollouts/{rid}/approve", {})
    shadow = in_wave(world, rid, 1)
    rest = in_wave(world, rid, 2)
    assert len(shadow) == 2 and len(rest) == 6
    r = world.wait_rollout(rid, ("rolled_back", "completed", "paused"), timeout=150)
    assert r["state"] == "rolled_back", r
    assert "shadow gate" in r["reason"] and "challenger accuracy" in r["reason"], r["reason"]
    figures = r["gates"]["quality"]["shadow"]
    assert figures["challenger_accuracy"] < 0.3 < figures["champion_accuracy"], figures

    devices = sim_devices(world)
    poll(
        "the shadow devices drop the challenger",
        lambda: all(shadow_status(devices[d]) is None for d in shadow),
        timeout=60,
    )
    for d in shadow:
        assert world.recorder.count(d, bad) >= 1  # it ran the challenger in shadow...
        assert deployments_seen(world, d, bad) == {"shadow"}  # ...only ever signed as shadow
    for d in rest:
        assert world.recorder.count(d, bad) == 0, world.recorder.seen.get(d)
    # No device ever served the challenger: not one answer, not one status report.
    for d, dev in devices.items():
        assert set(dev.served) == {champion}, (d, dev.served)
        history = world.get(f"/rollouts/{rid}/devices/{d}")["history"]
        assert not any(h.get("model_version") == bad for h in history), history
        assert world.get(f"/devices/{d}")["model_version"] == champion
    assert all(v == champion for v in world.serving().values())
    assert world.get(f"/model-lines/digits/versions/{bad}")["status"] == "rejected"
