"""Plans of waves on a real database: membership, late joiners, manual gates, restarts, and the
operator's pause/resume/rollback (simulated devices, no threads, injected time)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert

from server.db.rollouts import RolloutWave
from server.fleet.mqtt_bridge import RecordingPublisher
from server.rollout.engine import RolloutEngine
from server.services import Services
from tests.server.conftest import add_version, create_line, register, services_of
from tests.server.test_rollout_engine import install, metrics, release_of, target, version_of

DEVICES = [f"cam-{i:02d}" for i in range(10)]
PLAN = [
    {"percent": 10, "name": "canary"},
    {"percent": 50},
    {"percent": 100, "manual_gate": True},
]


def setup(client: TestClient, waves: list[dict[str, Any]] | None = PLAN) -> tuple[Services, int]:
    create_line(client)
    for d in DEVICES:
        register(client, d)
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    body: dict[str, Any] = {"model_line": "digits", "model_version": 2}
    if waves is not None:
        body["waves"] = waves
    resp = client.post("/api/v1/rollouts", json=body)
    assert resp.status_code == 201, resp.text
    return services, resp.json()["id"]


def sent(services: Services) -> list[str]:
    pub = services.publisher
    assert isinstance(pub, RecordingPublisher)
    out = [d for d, _ in pub.sent]
    pub.clear()
    return out


def devices_in(client: TestClient, rid: int, wave: int) -> list[str]:
    rows = client.get(f"/api/v1/rollouts/{rid}/devices", params={"wave": wave}).json()
    return [r["device_id"] for r in rows]


def good_traffic(services: Services, rid: int, new: list[str], old: list[str]) -> None:
    for d in new:
        metrics(services, d, 2, labelled=60, correct=55, rollout_id=rid)
    for d in old:
        metrics(services, d, 1, labelled=60, correct=55)
    services.ingest.drain()


def test_three_waves_late_joiner_manual_gate_and_no_double_advance(client: TestClient) -> None:
    services, rid = setup(client)
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "pending_approval" and [w["state"] for w in r["waves"]] == ["pending"] * 3
    assert sent(services) == []  # nothing is sent before approval

    resp = client.post(f"/api/v1/rollouts/{rid}/approve", json={})
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["state"] == "canary" and r["approved_by"] == "admin"
    w1, w2, w3 = (devices_in(client, rid, i) for i in (1, 2, 3))
    assert (len(w1), len(w2), len(w3)) == (1, 4, 5)
    assert sent(services) == w1
    assert r["devices"] == {"canary": {"notified": 1}, "rest": {"queued": 9}}
    for d in w2 + w3:
        assert version_of(target(client, d)) == 1  # later waves are not told yet

    t = services.clock()
    install(services, w1, rid, 2)
    good_traffic(services, rid, w1, w2 + w3)
    adv = services.rollouts.tick(t + timedelta(seconds=1))[rid]
    assert adv.action.value == "advance", adv
    assert sorted(sent(services)) == sorted(w2)
    # A restarted engine (or a second server) on the same database does not advance again.
    other = RolloutEngine(
        settings=services.settings,
        sessions=services.sessions,
        signer=services.signer,
        publisher=RecordingPublisher(),
    )
    assert other.tick(t + timedelta(seconds=1))[rid].action.value == "wait"
    assert other.publisher.sent == []  # type: ignore[attr-defined]
    with services.sessions() as session, pytest.raises(Exception):  # noqa: B017, PT011
        session.execute(insert(RolloutWave), [{"rollout_id": rid, "wave": 1, "started_by": "x"}])
        session.commit()

    # A device enrolling now is told the line's current release at once (no tick may ever
    # look at it again), then lands in its wave by hash: released at the next tick if that
    # wave started.
    register(client, "cam-late")
    pub = services.publisher
    assert isinstance(pub, RecordingPublisher)
    assert [(d, version_of(m.to_dict())) for d, m in pub.sent] == [("cam-late", 1)]
    pub.clear()
    services.rollouts.tick(t + timedelta(seconds=2))
    late = client.get(f"/api/v1/rollouts/{rid}/devices/cam-late").json()
    late_sent = [(d, version_of(m.to_dict())) for d, m in pub.sent]
    pub.clear()
    if late["wave"] <= 2:
        assert late["state"] == "notified" and late_sent == [("cam-late", 2)]
    else:
        assert late["state"] == "queued" and late_sent == []

    wave2 = [d for d in devices_in(client, rid, 2)]
    install(services, wave2, rid, 2)
    good_traffic(services, rid, w1 + wave2, w3)
    services.rollouts.tick(t + timedelta(seconds=3))
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "awaiting_gate", r["reason"]
    assert [w["state"] for w in r["waves"]] == ["succeeded", "succeeded", "awaiting_approval"]
    assert sent(services) == []
    r = client.post(f"/api/v1/rollouts/{rid}/approve", json={}).json()
    assert r["state"] == "full" and r["waves"][2]["started_by"] == "admin"
    wave3 = devices_in(client, rid, 3)
    assert sorted(sent(services)) == sorted(wave3)
    install(services, wave3, rid, 2)
    services.ingest.drain()
    done = services.rollouts.tick(t + timedelta(seconds=4))[rid]
    assert done.action.value == "advance", done
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "completed"
    assert all(version_of(target(client, d)) == 2 for d in [*DEVICES, "cam-late"])
    starts = [
        e
        for e in client.get(f"/api/v1/rollouts/{rid}/events").json()
        if e["state"] in ("approved", "wave_started")
    ]
    assert [e["wave"] for e in starts] == [1, 2, 3]


def test_pause_resume_and_rollback_after_completion(client: TestClient) -> None:
    services, rid = setup(client, waves=[{"percent": 100}])
    r = client.post(f"/api/v1/rollouts/{rid}/approve", json={}).json()
    assert r["state"] == "full"
    r = client.post(f"/api/v1/rollouts/{rid}/pause", json={"by": "admin"}).json()
    assert r["state"] == "paused" and "admin" in r["reason"]
    assert services.rollouts.tick() == {}  # a paused rollout does not move
    r = client.post(f"/api/v1/rollouts/{rid}/resume").json()
    assert r["state"] == "full"
    install(services, DEVICES, rid, 2)
    good_traffic(services, rid, DEVICES, [])
    services.rollouts.tick(services.clock() + timedelta(seconds=1))
    assert client.get(f"/api/v1/rollouts/{rid}").json()["state"] == "completed"
    resp = client.post(f"/api/v1/rollouts/{rid}/rollback", json={"reason": "customer report"})
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["state"] == "rolled_back" and r["rollback_release"] == 3
    for d in DEVICES:
        t = target(client, d)
        assert (release_of(t), version_of(t)) == (3, 1)
    line = client.get("/api/v1/model-lines/digits").json()
    assert (line["champion_version"], line["current_release"]) == (1, 3)
    assert client.post(f"/api/v1/rollouts/{rid}/rollback").status_code == 409


@pytest.mark.parametrize(
    "waves",
    [
        [],
        [{"percent": 50}],
        [{"percent": 50}, {"percent": 30}, {"percent": 100}],
        [{"percent": 10, "selector": {"groups": ["lab"]}}, {"percent": 100}],
        [{"percent": 0}, {"percent": 100}],
        [{"percent": "ten"}, {"percent": 100}],
        [{"percent": 10, "success_pct": 101}, {"percent": 100}],
        [{"percent": 10, "abort": {"min_devices": 0}}, {"percent": 100}],
        [{"percent": 10, "timeout_s": 0}, {"percent": 100}],
        [{"percent": 10, "colour": "red"}, {"percent": 100}],
        [{"selector": {"groups": []}}, {"percent": 100}],
        [{"selector": {"groups": ["bad group!"]}}, {"percent": 100}],
        [{"percent": 10, "min_soak_s": float("inf")}, {"percent": 100}],
        "not a list",
        [{"percent": 10}] * 21,
    ],
)
def test_malformed_plans_are_4xx(client: TestClient, waves: Any) -> None:
    create_line(client)
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    body = {"model_line": "digits", "model_version": 2, "waves": waves}
    resp = client.post(
        "/api/v1/rollouts", content=_json(body), headers={"content-type": "application/json"}
    )
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["detail"]


def _json(body: Any) -> str:
    import json

    return json.dumps(body)


def test_other_bad_requests_are_4xx(client: TestClient) -> None:
    services, rid = setup(client, waves=None)
    both = {
        "model_line": "digits",
        "model_version": 2,
        "canary_percent": 10,
        "waves": [{"percent": 100}],
    }
    assert client.post("/api/v1/rollouts", json=both).status_code == 422
    assert client.get("/api/v1/rollouts/999").status_code == 404
    assert client.get("/api/v1/rollouts/999/devices").status_code == 404
    assert client.get("/api/v1/rollouts/999/events").status_code == 404
    assert client.get(f"/api/v1/rollouts/{rid}/devices/nobody").status_code == 404
    assert client.get(f"/api/v1/rollouts/{rid}/devices", params={"wave": 0}).status_code == 422
    assert client.post(f"/api/v1/rollouts/{rid}/resume").status_code == 409
    assert client.post(f"/api/v1/rollouts/{rid}/rollback").status_code == 409
    assert client.post(f"/api/v1/rollouts/{rid}/pause", json={"by": ""}).status_code == 422
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    # Without a plan: the settings' default (canary_percent, then everyone).
    assert [w["spec"]["percent"] for w in r["waves"]] == [20, 100]


def test_cli_watch_once_prints_progress_per_wave(client: TestClient, monkeypatch) -> None:
    from typer.testing import CliRunner

    from server.cli import base as cli_base
    from server.cli.main import app as cli_app

    services, rid = setup(client)
    client.post(f"/api/v1/rollouts/{rid}/approve", json={})

    def call(method: str, path: str, json: Any = None, params: Any = None) -> Any:
        return client.request(method, path, json=json, params=params).json()

    monkeypatch.setattr(cli_base, "call", call)
    # The attribute the width property sets: undoing it restores "not set" (patching the
    # property itself would pin the width it computed, 80, for every later CLI test).
    monkeypatch.setattr(cli_base.console, "_width", 140)
    out = CliRunner().invoke(cli_app, ["rollouts", "watch", str(rid), "--once"])
    assert out.exit_code == 0, out.output
    assert f"rollout #{rid}" in out.output and "canary" in out.output
    assert "running" in out.output and "0/1" in out.output and "pending" in out.output
