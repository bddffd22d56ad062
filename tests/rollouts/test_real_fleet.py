"""Staged rollouts on a real fleet: real agents, real Mosquitto, the server process.

- A model trained on flipped labels is stopped at the canary by the quality gates; the canary
  devices go back to the previous model; no device outside the canary ever hears of it.
- A good model goes through every wave to the whole fleet, including devices that come online
  in the middle of the rollout.
- Killing the server mid-rollout and starting it again on the same database neither loses
  progress nor starts a wave twice.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import poll
from tests.rollouts.conftest import World

pytestmark = pytest.mark.slow

CANARY_PLAN = [{"percent": 25, "name": "canary"}, {"percent": 100}]
THREE_WAVES = [{"percent": 25, "name": "canary"}, {"percent": 50}, {"percent": 100}]


def in_wave(world: World, rid: int, wave: int) -> list[str]:
    return [r["device_id"] for r in world.get(f"/rollouts/{rid}/devices", wave=wave)]


def test_flipped_label_model_is_stopped_at_the_canary_and_rolled_back(world: World) -> None:
    world.start_fleet(8)
    bad = world.train(flipped=True)
    rid = world.create_rollout(bad, CANARY_PLAN)
    time.sleep(1.0)
    assert world.get(f"/rollouts/{rid}")["state"] == "pending_approval"
    assert all(world.recorder.count(d, bad) == 0 for d in world.devices())  # waits for approval

    world.post(f"/rollouts/{rid}/approve", {})
    canary = in_wave(world, rid, 1)
    rest = in_wave(world, rid, 2)
    assert len(canary) == 2 and len(rest) == 6
    r = world.wait_rollout(rid, ("rolled_back", "completed", "paused"))
    assert r["state"] == "rolled_back", r
    assert "quality gate" in r["reason"] and "accuracy" in r["reason"], r["reason"]
    rollback_release = r["rollback_release"]

    # The canary devices go back to the previous model on their own (signed rollback release).
    poll(
        "every device serving the champion again",
        lambda: all(v == r["from_version"] for v in world.serving().values()),
        timeout=60,
    )
    for d in canary:
        assert world.recorder.count(d, bad) >= 1  # it did get the bad model...
        history = world.get(f"/rollouts/{rid}/devices/{d}")["history"]
        assert any(h.get("model_version") == bad for h in history)  # ...and served it
    # Nobody outside the canary ever heard of the bad release or reported serving it.
    for d in rest:
        assert world.recorder.count(d, bad) == 0, world.recorder.seen.get(d)
        row = world.get(f"/rollouts/{rid}/devices/{d}")
        assert row["state"] == "queued" and row["notified_at"] is None
        assert not any(h.get("model_version") == bad for h in row["history"])
        assert world.get(f"/devices/{d}")["model_version"] == r["from_version"]
    poll(
        "the rollback release announced to everyone",
        lambda: all(
            any(rel == rollback_release for rel, _, _ in world.recorder.seen.get(d, []))
            for d in world.devices()
        ),
        timeout=30,
    )
    version = world.get(f"/model-lines/digits/versions/{bad}")
    assert version["status"] == "rejected"


def test_good_model_goes_through_every_wave_also_to_devices_that_join_late(
    world: World,
) -> None:
    world.start_fleet(6)
    good = world.train()
    rid = world.create_rollout(good, THREE_WAVES)
    world.post(f"/rollouts/{rid}/approve", {})
    # Two devices come online while the canary runs: each lands in the wave its hash says.
    late = world.start_fleet(2, prefix="late")
    r = world.wait_rollout(rid, ("completed", "rolled_back", "paused"), timeout=170)
    assert r["state"] == "completed", json.dumps(r)
    assert [w["state"] for w in r["waves"]] == ["succeeded"] * 3
    poll(
        "every device on the new model",
        lambda: all(v == good for v in world.serving().values()),
        timeout=60,
    )
    rows = {row["device_id"]: row for row in world.get(f"/rollouts/{rid}/devices")}
    assert set(rows) == set(world.devices())
    for d in late.devices:
        assert rows[d.device_id]["state"] in ("committed", "already_installed")
    events = world.get(f"/rollouts/{rid}/events")
    starts = [e["wave"] for e in events if e["state"] in ("approved", "wave_started")]
    assert starts == [1, 2, 3]


def test_server_killed_mid_rollout_resumes_without_losing_or_repeating_a_wave(
    world: World,
) -> None:
    world.start_fleet(8)
    good = world.train()
    rid = world.create_rollout(good, THREE_WAVES)
    world.post(f"/rollouts/{rid}/approve", {})
    world.wait_rollout(rid, ("rolling",), timeout=120)  # wave 2 of 3 running
    world.server.stop(kill=True)
    time.sleep(2.0)  # devices keep serving; their reports wait in the broker
    world.server.start()
    after = world.get(f"/rollouts/{rid}")
    assert after["state"] in ("rolling", "full", "completed") and after["stage"] >= 1, after
    r = world.wait_rollout(rid, ("completed", "rolled_back", "paused"), timeout=150)
    assert r["state"] == "completed", r
    events = world.get(f"/rollouts/{rid}/events")
    starts = [e["wave"] for e in events if e["state"] in ("approved", "wave_started")]
    assert starts == [1, 2, 3]  # no wave skipped, none started twice
    poll(
        "every device on the new model",
        lambda: all(v == good for v in world.serving().values()),
        timeout=60,
    )
    for d in world.devices():
        # Every device heard of the new release; repeats (the restart re-announces targets)
        # carry the same release, and the agent installs it once.
        releases = {rel for rel, v, _ in world.recorder.seen.get(d, []) if v == good}
        assert len(releases) == 1, world.recorder.seen.get(d)
        history = world.get(f"/rollouts/{rid}/devices/{d}")["history"]
        installs = [h for h in history if h["source"] == "device" and h["state"] == "committed"]
        assert len(installs) == 1, history
