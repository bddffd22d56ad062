"""The rollout engine on a real database with simulated devices (no threads, injected time)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from contract import MetricsReport, StatusReport
from contract.messages import DeviceState
from server.fleet.mqtt_bridge import RecordingPublisher
from server.rollout.engine import RolloutEngine
from server.services import Services
from tests.server.conftest import add_version, create_line, register, services_of

DEVICES = [f"cam-{i:02d}" for i in range(10)]


@pytest.fixture
def fleet(client: TestClient) -> tuple[TestClient, Services, int]:
    create_line(client)
    for d in DEVICES:
        register(client, d)
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    resp = client.post(
        "/api/v1/rollouts",
        json={"model_line": "digits", "model_version": 2, "canary_percent": 20},
    )
    assert resp.status_code == 201, resp.text
    return client, services, resp.json()["id"]


def status(
    services: Services,
    device: str,
    state: DeviceState,
    version: int,
    *,
    rollout_id: int | None,
    target_release: int | None,
    release: int | None = None,
    reason: str | None = None,
) -> None:
    services.ingest.submit(
        "status",
        StatusReport(
            device_id=device,
            ts=services.clock().timestamp(),
            state=state,
            model_line="digits",
            model_version=version,
            release=release or target_release,
            rollout_id=rollout_id,
            target_release=target_release,
            reason=reason,
        ),
    )


def metrics(
    services: Services,
    device: str,
    version: int,
    *,
    labelled: int,
    correct: int,
    p95: float = 5.0,
    errors: int = 0,
    rollout_id: int | None = None,
) -> None:
    services.ingest.submit(
        "metrics",
        MetricsReport(
            device_id=device,
            ts=services.clock().timestamp(),
            model_line="digits",
            model_version=version,
            window_s=10.0,
            inferences=labelled * 2,
            errors=errors,
            labelled=labelled,
            correct=correct,
            latency_ms_p50=p95 / 2,
            latency_ms_p95=p95,
            rollout_id=rollout_id,
        ),
    )


def approve(client: TestClient, rid: int) -> dict:
    resp = client.post(f"/api/v1/rollouts/{rid}/approve", json={})
    assert resp.status_code == 200, resp.text
    return resp.json()


def target(client: TestClient, device: str) -> dict:
    resp = client.get(f"/api/v1/devices/{device}/target")
    assert resp.status_code == 200, resp.text
    return resp.json()


def release_of(t: dict) -> int:
    import base64
    import json

    return json.loads(base64.b64decode(t["envelope"]["payload"]))["release"]


def version_of(t: dict) -> int:
    import base64
    import json

    return json.loads(base64.b64decode(t["envelope"]["payload"]))["model_version"]


def canary_of(services: Services) -> list[str]:
    pub = services.publisher
    assert isinstance(pub, RecordingPublisher)
    return sorted({d for d, _ in pub.sent})


def install(services: Services, devices: list[str], rid: int, release: int) -> None:
    for d in devices:
        status(services, d, DeviceState.DOWNLOADING, 1, rollout_id=rid, target_release=release)
        status(services, d, DeviceState.COMMITTED, 2, rollout_id=rid, target_release=release)


def test_approve_targets_only_the_canary(fleet) -> None:
    client, services, rid = fleet
    r = approve(client, rid)
    assert r["state"] == "canary" and r["release"] == 2
    canary = canary_of(services)
    assert len(canary) == 2 and r["devices"]["canary"] == {"notified": 2}
    for d in DEVICES:
        t = target(client, d)
        if d in canary:
            assert (release_of(t), version_of(t), t["rollout_id"]) == (2, 2, rid)
        else:
            assert (release_of(t), version_of(t), t["rollout_id"]) == (1, 1, None)


def test_bad_canary_metrics_roll_back_with_a_higher_release(fleet) -> None:
    client, services, rid = fleet
    approve(client, rid)
    canary = canary_of(services)
    services.publisher.clear()  # type: ignore[attr-defined]
    install(services, canary, rid, 2)
    for d in canary:
        metrics(services, d, 2, labelled=40, correct=20, rollout_id=rid)  # 50% accuracy
    for d in set(DEVICES) - set(canary):
        metrics(services, d, 1, labelled=100, correct=95)
    services.ingest.drain()
    decisions = services.rollouts.tick(services.clock() + timedelta(seconds=1))
    assert decisions[rid].action.value == "rollback", decisions[rid]
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "rolled_back" and "accuracy" in r["reason"]
    assert r["rollback_release"] == 3 > r["release"] == 2
    for d in DEVICES:
        t = target(client, d)
        assert (release_of(t), version_of(t)) == (3, 1)
    published = dict(services.publisher.sent)  # type: ignore[attr-defined]
    assert set(published) == set(DEVICES)
    assert all(release_of(m.to_dict()) == 3 for m in published.values())
    v2 = client.get("/api/v1/model-lines/digits/versions/2").json()
    assert v2["status"] == "rejected"
    line = client.get("/api/v1/model-lines/digits").json()
    assert (line["champion_version"], line["current_release"]) == (1, 3)
    # Idempotent: ticking again (or another engine on the same DB) changes nothing.
    assert services.rollouts.tick(services.clock() + timedelta(seconds=2)) == {}


def test_good_metrics_advance_to_full_then_complete(fleet) -> None:
    client, services, rid = fleet
    approve(client, rid)
    canary = canary_of(services)
    rest = sorted(set(DEVICES) - set(canary))
    install(services, canary, rid, 2)
    services.ingest.drain()
    wait = services.rollouts.tick(services.clock() + timedelta(seconds=1))[rid]
    assert wait.action.value == "wait" and "evidence" in wait.reason
    for d in canary:
        metrics(services, d, 2, labelled=40, correct=37, rollout_id=rid)
    for d in rest:
        metrics(services, d, 1, labelled=100, correct=92)
    services.ingest.drain()
    services.publisher.clear()  # type: ignore[attr-defined]
    adv = services.rollouts.tick(services.clock() + timedelta(seconds=1))[rid]
    assert adv.action.value == "advance", adv
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "full" and r["devices"]["rest"] == {"notified": 8}
    assert canary_of(services) == rest
    # A second engine on the same database (a restart) does not advance twice.
    other = RolloutEngine(
        settings=services.settings,
        sessions=services.sessions,
        signer=services.signer,
        publisher=RecordingPublisher(),
    )
    assert other.tick(services.clock() + timedelta(seconds=1))[rid].action.value == "wait"
    install(services, rest, rid, 2)
    services.ingest.drain()
    done = services.rollouts.tick(services.clock() + timedelta(seconds=2))[rid]
    assert done.action.value == "advance", done
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "completed"
    line = client.get("/api/v1/model-lines/digits").json()
    assert (line["champion_version"], line["current_release"]) == (2, 2)
    statuses = {
        v["version"]: v["status"] for v in client.get("/api/v1/model-lines/digits/versions").json()
    }
    assert statuses == {1: "retired", 2: "champion"}
    assert all(version_of(target(client, d)) == 2 for d in DEVICES)


def test_stuck_canary_times_out_is_retried_with_backoff_then_quarantined_and_rolled_back(
    fleet,
) -> None:
    client, services, rid = fleet
    approve(client, rid)
    canary = canary_of(services)
    status(services, canary[0], DeviceState.DOWNLOADING, 1, rollout_id=rid, target_release=2)
    services.ingest.drain()
    s = services.settings
    t0 = services.clock()
    d = services.rollouts.tick(t0 + timedelta(seconds=s.install_timeout_s + 1))[rid]
    assert d.action.value == "wait" and set(d.timed_out) == set(canary)
    rows = client.get(f"/api/v1/rollouts/{rid}/devices", params={"wave": 1}).json()
    assert {r["state"] for r in rows} == {"timed_out"}
    assert all("no progress" in r["reason"] for r in rows)
    # Time moves on: retries after a doubling backoff, each attempt times out again, the third
    # failed attempt quarantines the devices, and a canary of failures rolls back.
    now, seen = t0, []
    for _ in range(12):
        now += timedelta(seconds=s.install_timeout_s + 4 * s.rollout_retry_backoff_s)
        seen.append(services.rollouts.tick(now).get(rid))
        if seen[-1] is None or seen[-1].action.value == "rollback":
            break
    assert seen[-1] is not None and seen[-1].action.value == "rollback", seen
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "rolled_back", r
    assert r["devices"]["canary"] == {"quarantined": 2}, r["devices"]
    history = client.get(f"/api/v1/rollouts/{rid}/devices/{canary[0]}").json()
    states = [h["state"] for h in history["history"] if h["source"] == "server"]
    assert states[:2] == ["queued", "notified"] and "timed_out" in states
    reasons = [h["reason"] for h in history["history"]]
    assert "retry 1 of 2" in reasons and "retry 2 of 2" in reasons
    assert history["state"] == "quarantined" and "quarantined for" in history["reason"]
    assert history["attempts"] == 2 and history["failures"] == 3


def test_refusing_canary_rolls_back(fleet) -> None:
    client, services, rid = fleet
    approve(client, rid)
    canary = canary_of(services)
    for dev in canary:
        status(
            services,
            dev,
            DeviceState.REFUSED,
            1,
            rollout_id=rid,
            target_release=2,
            release=1,
            reason="signature check failed",
        )
    services.ingest.drain()
    d = services.rollouts.tick(services.clock() + timedelta(seconds=1))[rid]
    assert d.action.value == "rollback" and "2 of 2" in d.reason


def test_status_batch_for_many_rollout_devices_is_written_in_one_transaction(fleet) -> None:
    """Reports of several rollout devices go in one executemany, not the one-by-one fallback."""
    client, services, rollout_id = fleet
    services.rollouts.approve(rollout_id, approver="ci")
    detail = client.get(f"/api/v1/rollouts/{rollout_id}").json()
    release = detail["release"]
    members = [d["device_id"] for d in client.get(f"/api/v1/rollouts/{rollout_id}/devices").json()]
    assert len(members) >= 2
    for d in members:
        status(
            services, d, DeviceState.DOWNLOADING, 1, rollout_id=rollout_id, target_release=release
        )
    services.ingest.drain()
    assert services.ingest.stats.batch_fallbacks == 0
    assert services.ingest.stats.failed_writes == 0
    states = {
        d["device_id"]: d["state"]
        for d in client.get(f"/api/v1/rollouts/{rollout_id}/devices").json()
    }
    assert all(states[d] == "downloading" for d in members), states
