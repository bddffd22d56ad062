"""Per-class recall gate end to end: metrics reports -> ingest -> class_metrics -> engine."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from contract import MetricsReport
from contract.messages import ClassCount
from server.db.quality import ClassMetric
from server.services import Services
from tests.server.conftest import add_version, create_line, register, services_of
from tests.server.test_rollout_engine import (
    DEVICES,
    canary_of,
    install,
    release_of,
    target,
    version_of,
)


@pytest.fixture
def fleet(client: TestClient) -> tuple[TestClient, Services, int]:
    """Ten devices on v1, a rollout of v2 with a 20% canary, approved (via the engine)."""
    create_line(client)
    for d in DEVICES:
        register(client, d)
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    rollout = services.rollouts.create(
        model_line="digits", model_version=2, canary_percent=20, created_by="ci"
    )
    services.rollouts.approve(rollout.id, approver="alice")
    return client, services, rollout.id


def class_metrics(
    services: Services, device: str, version: int, counts: dict[int, tuple[int, int]]
) -> None:
    labelled = sum(n for n, _ in counts.values())
    services.ingest.submit(
        "metrics",
        MetricsReport(
            device_id=device,
            ts=services.clock().timestamp(),
            model_line="digits",
            model_version=version,
            window_s=10.0,
            inferences=labelled,
            errors=0,
            labelled=labelled,
            correct=sum(ok for _, ok in counts.values()),
            latency_ms_p50=2.0,
            latency_ms_p95=5.0,
            class_counts=tuple(ClassCount(c, n, ok) for c, (n, ok) in sorted(counts.items())),
        ),
    )


def test_a_canary_that_destroys_one_class_is_rolled_back_naming_it(fleet) -> None:
    client, services, rid = fleet
    canary = canary_of(services)
    install(services, canary, rid, 2)
    # Champion everywhere else: 90% on each of 10 classes. The canary: class 7 at 10%, every
    # other class at 100%: overall 91%, better than the champion on average.
    for d in set(DEVICES) - set(canary):
        class_metrics(services, d, 1, {c: (30, 27) for c in range(10)})
    for d in canary:
        class_metrics(services, d, 2, {c: (15, 1 if c == 7 else 15) for c in range(10)})
    services.ingest.drain()
    with services.sessions() as s:
        rows = s.scalar(select(func.count()).select_from(ClassMetric))
        support = s.scalar(
            select(func.sum(ClassMetric.support)).where(
                ClassMetric.model_version == 2, ClassMetric.label == 7
            )
        )
    assert rows == 10 * len(DEVICES) and support == 15 * len(canary)
    decisions = services.rollouts.tick(services.clock() + timedelta(seconds=1))
    assert decisions[rid].action.value == "rollback", decisions[rid]
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "rolled_back"
    assert "per-class recall: class 7 ('7') recall 0.067 (2/30)" in r["reason"], r["reason"]
    assert "reference 0.900 (216/240)" in r["reason"]
    worst = r["gates"]["quality"]["class_recall"][0]
    assert (worst["label"], worst["support"], worst["reference_support"]) == (7, 30, 240)
    for d in DEVICES:
        t = target(client, d)
        assert (release_of(t), version_of(t)) == (3, 1)


def test_a_canary_with_per_class_noise_within_the_bound_advances(fleet) -> None:
    client, services, rid = fleet
    canary = canary_of(services)
    install(services, canary, rid, 2)
    for d in set(DEVICES) - set(canary):
        class_metrics(services, d, 1, {c: (30, 27) for c in range(10)})
    noisy = [17, 18, 19, 18, 17, 19, 18, 18, 19, 17]  # of 20: recall 0.85..0.95, mean 0.90
    for d in canary:
        class_metrics(services, d, 2, {c: (20, ok) for c, ok in enumerate(noisy)})
    services.ingest.drain()
    later = services.clock() + timedelta(seconds=60)
    decisions = services.rollouts.tick(later)
    assert decisions[rid].action.value == "advance", decisions[rid]
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] in ("rolling", "full"), r
    assert all(row["drop"] <= 0.10 for row in r["gates"]["quality"]["class_recall"])


# ---- shadow waves ------------------------------------------------------------------------------

SHADOW_PLAN = [{"percent": 20, "kind": "shadow"}, {"percent": 100}]


def payload_of(t: dict) -> dict:
    import base64
    import json

    return json.loads(base64.b64decode(t["envelope"]["payload"]))


@pytest.fixture
def shadow_fleet(client: TestClient) -> tuple[TestClient, Services, int]:
    create_line(client)
    for d in DEVICES:
        register(client, d)
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    rollout = services.rollouts.create(
        model_line="digits",
        model_version=2,
        canary_percent=None,
        created_by="ci",
        waves=SHADOW_PLAN,
    )
    services.rollouts.approve(rollout.id, approver="alice")
    return client, services, rollout.id


def shadow_report(
    services: Services, device: str, *, compared: int, agreed: int, champ: int, chall: int
) -> None:
    from contract.messages import ShadowFigures

    labelled = compared
    services.ingest.submit(
        "metrics",
        MetricsReport(
            device_id=device,
            ts=services.clock().timestamp(),
            model_line="digits",
            model_version=1,
            window_s=10.0,
            inferences=compared,
            errors=0,
            labelled=labelled,
            correct=champ,
            latency_ms_p50=2.0,
            latency_ms_p95=5.0,
            shadow=ShadowFigures(
                model_version=2,
                compared=compared,
                agreed=agreed,
                labelled=labelled,
                champion_correct=champ,
                challenger_correct=chall,
            ),
        ),
    )


def settle_in_shadow(services: Services, devices: list[str], rid: int, release: int) -> None:
    from contract import StatusReport
    from contract.messages import DeviceState

    for d in devices:
        services.ingest.submit(
            "status",
            StatusReport(
                device_id=d,
                ts=services.clock().timestamp(),
                state=DeviceState.SHADOW,
                model_line="digits",
                model_version=1,  # still serving the champion
                release=release,
                rollout_id=rid,
                target_release=release,
            ),
        )


def test_a_shadow_wave_gets_a_signed_shadow_release_then_a_higher_serve_release(
    shadow_fleet,
) -> None:
    client, services, rid = shadow_fleet
    shadow = canary_of(services)
    assert len(shadow) == 2
    t = target(client, shadow[0])
    assert (release_of(t), version_of(t), payload_of(t)["deployment"]) == (2, 2, "shadow")
    outside = sorted(set(DEVICES) - set(shadow))
    assert all("deployment" not in payload_of(target(client, d)) for d in outside)
    settle_in_shadow(services, shadow, rid, 2)
    for d in shadow:
        shadow_report(services, d, compared=40, agreed=30, champ=28, chall=38)
    services.ingest.drain()
    rows = client.get(f"/api/v1/rollouts/{rid}/devices", params={"wave": 1}).json()
    assert {r["state"] for r in rows} == {"shadow"}
    decisions = services.rollouts.tick(services.clock() + timedelta(seconds=60))
    assert decisions[rid].action.value == "advance", decisions[rid]
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "full" and r["release"] == 3, r
    figures = r["gates"]["quality"]["shadow"]
    assert (figures["compared"], figures["agreed"], figures["labelled"]) == (80, 60, 80)
    assert (figures["champion_accuracy"], figures["challenger_accuracy"]) == (0.7, 0.95)
    # Everyone, the shadow devices included, now gets release 3, which serves.
    for d in DEVICES:
        t = target(client, d)
        assert (release_of(t), version_of(t)) == (3, 2)
        assert "deployment" not in payload_of(t)


def test_a_failed_shadow_gate_rolls_back_before_any_device_serves(shadow_fleet) -> None:
    client, services, rid = shadow_fleet
    shadow = canary_of(services)
    settle_in_shadow(services, shadow, rid, 2)
    for d in shadow:
        shadow_report(services, d, compared=40, agreed=4, champ=36, chall=4)
    services.ingest.drain()
    decisions = services.rollouts.tick(services.clock() + timedelta(seconds=60))
    assert decisions[rid].action.value == "rollback", decisions[rid]
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "rolled_back"
    assert "shadow gate: challenger accuracy 0.100 is below the champion's 0.900" in r["reason"]
    for d in DEVICES:  # the shadow devices are withdrawn with a higher champion release
        t = target(client, d)
        assert (release_of(t), version_of(t)) == (3, 1)
        assert "deployment" not in payload_of(t)


def test_a_shadow_wave_must_be_first_and_not_alone(client: TestClient) -> None:
    create_line(client)
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    for waves, message in (
        ([{"percent": 100, "kind": "shadow"}], "only the first wave of a plan with later waves"),
        (
            [{"percent": 10}, {"percent": 20, "kind": "shadow"}, {"percent": 100}],
            "wave 2: only the first wave",
        ),
    ):
        resp = client.post(
            "/api/v1/rollouts",
            json={"model_line": "digits", "model_version": 2, "waves": waves},
        )
        assert resp.status_code == 422 and message in resp.text, resp.text
    resp = client.post(
        "/api/v1/rollouts",
        json={
            "model_line": "digits",
            "model_version": 2,
            "waves": [{"percent": 10, "kind": "sometimes"}, {"percent": 100}],
        },
    )
    assert resp.status_code == 422, resp.text
