"""Signed targeting set by the server: a rollout's audience is signed into its releases, only
matching devices become members, and the model's opset travels with it (SQLite and PostgreSQL
via ``db_url``; the engine is driven in-process, no threads)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from contract import verify_manifest
from contract.manifest import Manifest, Targeting
from device_agent.errors import RuntimeIncompatibleError, TargetingMismatchError
from device_agent.verify import DeviceFacts, check_targeting
from server.db.registry import ModelVersion
from server.db.rollouts import RolloutDevice
from server.fleet.mqtt_bridge import RecordingPublisher
from server.services import Services
from tests.authkit import enroll
from tests.server.conftest import LINE, add_version, create_line, services_of

CAM_V2 = ["cam-a", "cam-b", "cam-c"]
CAM_V1 = ["old-a", "old-b"]
OPSET = 17


@pytest.fixture
def fleet(client: TestClient) -> tuple[TestClient, Services]:
    """Three cam-v2 devices (group "north"), two cam-v1 (group "south"); v1 champion, v2
    candidate, both with the opset their training report records."""
    create_line(client)
    for d in CAM_V2:
        enroll(client, d, LINE, hardware="cam-v2", groups=["north"])
    for d in CAM_V1:
        enroll(client, d, LINE, hardware="cam-v1", groups=["south"])
    services = services_of(client)
    add_version(services, version=1, status="champion", champion_release=True)
    add_version(services, version=2, status="candidate")
    with services.sessions() as session:
        session.execute(update(ModelVersion).values(report={"opset": OPSET}))
        session.commit()
    return client, services


def create(client: TestClient, targeting: dict[str, Any] | None, **kw: Any) -> Any:
    body: dict[str, Any] = {"model_line": LINE, "model_version": 2, "waves": [{"percent": 100}]}
    if targeting is not None:
        body["targeting"] = targeting
    return client.post("/api/v1/rollouts", json={**body, **kw})


def approve(client: TestClient, rid: int) -> dict[str, Any]:
    resp = client.post(f"/api/v1/rollouts/{rid}/approve", json={})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def target(client: TestClient, device: str) -> dict[str, Any]:
    resp = client.get(f"/api/v1/devices/{device}/target")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def verified(services: Services, envelope: dict[str, Any]) -> Manifest:
    return verify_manifest(envelope, [services.signer.public_key], now=services.clock())


def members(services: Services, rid: int) -> list[str]:
    with services.sessions() as session:
        return sorted(
            session.scalars(
                select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rid)
            ).all()
        )


def test_hardware_targeting_is_signed_and_only_matching_devices_get_it(fleet) -> None:
    client, services = fleet
    resp = create(client, {"hardware_classes": ["cam-v2"], "min_runtime_version": "1.17"})
    assert resp.status_code == 201, resp.text
    rid = resp.json()["id"]
    assert resp.json()["targeting"]["hardware_classes"] == ["cam-v2"]
    r = approve(client, rid)
    assert r["state"] == "full" and r["devices"]["canary"] == {"notified": len(CAM_V2)}
    assert members(services, rid) == sorted(CAM_V2)
    pub = services.publisher
    assert isinstance(pub, RecordingPublisher)
    assert sorted({d for d, _ in pub.sent}) == sorted(CAM_V2)

    signed = Targeting(hardware_classes=("cam-v2",), opset=OPSET, min_runtime_version="1.17")
    for d in CAM_V2:
        m = verified(services, target(client, d)["envelope"])
        assert (m.release, m.model_version, m.targeting) == (2, 2, signed)
    for d in CAM_V1:
        t = target(client, d)
        assert t["rollout_id"] is None
        assert verified(services, t["envelope"]).release == 1

    # The device's own check agrees with the server's choice of members.
    m = verified(services, target(client, CAM_V2[0])["envelope"])
    check_targeting(
        m.targeting, DeviceFacts(CAM_V2[0], ("north",), "cam-v2", runtime_version="1.20")
    )
    with pytest.raises(TargetingMismatchError):
        check_targeting(m.targeting, DeviceFacts(CAM_V1[0], ("south",), "cam-v1", 21, "1.20"))
    with pytest.raises(RuntimeIncompatibleError):
        check_targeting(m.targeting, DeviceFacts(CAM_V2[0], (), "cam-v2", 13, "1.20"))

    # A device of the line that registers later and does not match never joins.
    enroll(client, "old-late", LINE, hardware="cam-v1")
    services.rollouts.tick(services.clock() + timedelta(seconds=1))
    assert members(services, rid) == sorted(CAM_V2)
    assert verified(services, target(client, "old-late")["envelope"]).release == 1


def test_groups_and_device_ids_narrow_the_audience(fleet) -> None:
    client, services = fleet
    resp = create(client, {"groups": ["north", "west"], "device_ids": ["cam-a", "old-a"]})
    assert resp.status_code == 201, resp.text
    rid = resp.json()["id"]
    approve(client, rid)
    assert members(services, rid) == ["cam-a"]  # in the group and named
    m = verified(services, target(client, "cam-a")["envelope"])
    assert m.targeting == Targeting(
        device_ids=("cam-a", "old-a"), groups=("north", "west"), opset=OPSET
    )
    assert verified(services, target(client, "old-a")["envelope"]).release == 1
    assert verified(services, target(client, "cam-b")["envelope"]).release == 1


def test_untargeted_rollout_signs_only_the_opset(fleet) -> None:
    client, services = fleet
    resp = create(client, None)
    assert resp.status_code == 201, resp.text
    assert resp.json()["targeting"] is None
    approve(client, resp.json()["id"])
    assert members(services, resp.json()["id"]) == sorted(CAM_V2 + CAM_V1)
    t = target(client, "old-a")
    payload = json.loads(base64.b64decode(t["envelope"]["payload"]))
    assert payload["targeting"] == Targeting(opset=OPSET).to_dict()


def test_no_opset_recorded_keeps_the_payload_without_targeting(fleet) -> None:
    client, services = fleet
    with services.sessions() as session:
        session.execute(update(ModelVersion).values(report={}))
        session.commit()
    resp = create(client, {})  # empty targeting = any device
    assert resp.status_code == 201, resp.text
    assert resp.json()["targeting"] is None
    approve(client, resp.json()["id"])
    payload = json.loads(base64.b64decode(target(client, "cam-a")["envelope"]["payload"]))
    assert "targeting" not in payload  # older payloads stay byte-equal


def test_rollback_release_admits_the_whole_line(fleet) -> None:
    client, services = fleet
    rid = create(client, {"hardware_classes": ["cam-v2"]}).json()["id"]
    approve(client, rid)
    resp = client.post(f"/api/v1/rollouts/{rid}/rollback", json={"reason": "bad"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["rollback_release"] == 3
    for d in CAM_V2 + CAM_V1:
        m = verified(services, target(client, d)["envelope"])
        # the old model back, for every device of the line: only the model's opset is signed
        assert (m.release, m.model_version, m.targeting) == (3, 1, Targeting(opset=OPSET))


@pytest.mark.parametrize(
    "targeting",
    [
        {"hardware_classes": [""]},
        {"hardware_classes": "cam-v2"},
        {"groups": ["not a name!"]},
        {"device_ids": [""]},
        {"min_runtime_version": "1.x"},
        {"min_runtime_version": 1.17},
        {"opset": 13},  # the opset is the model's, not the operator's
        {"regions": ["eu"]},
        ["cam-v2"],
    ],
)
def test_invalid_targeting_is_refused(fleet, targeting: Any) -> None:
    client, _ = fleet
    resp = create(client, targeting)
    assert resp.status_code == 422, resp.text
    assert "targeting" in resp.text  # the error names the field


def test_the_serve_release_after_a_shadow_wave_keeps_the_targeting(fleet) -> None:
    from tests.server.test_rollout_gates_engine import settle_in_shadow, shadow_report

    client, services = fleet
    waves = [{"percent": 50, "kind": "shadow"}, {"percent": 100}]
    rid = create(client, {"hardware_classes": ["cam-v2"]}, waves=waves).json()["id"]
    approve(client, rid)
    pub = services.publisher
    assert isinstance(pub, RecordingPublisher)
    shadow = sorted({d for d, _ in pub.sent})
    assert shadow and set(shadow) <= set(CAM_V2)
    m = verified(services, target(client, shadow[0])["envelope"])
    assert (m.release, m.deployment, m.targeting.hardware_classes) == (2, "shadow", ("cam-v2",))
    settle_in_shadow(services, shadow, rid, 2)
    for d in shadow:
        shadow_report(services, d, compared=80, agreed=60, champ=56, chall=76)
    services.ingest.drain()
    decisions = services.rollouts.tick(services.clock() + timedelta(seconds=60))
    assert decisions[rid].action.value == "advance", decisions[rid]
    assert members(services, rid) == sorted(CAM_V2)
    for d in CAM_V2:
        m = verified(services, target(client, d)["envelope"])
        assert (m.release, m.deployment) == (3, "serve")
        assert m.targeting == Targeting(hardware_classes=("cam-v2",), opset=OPSET)
    for d in CAM_V1:
        assert verified(services, target(client, d)["envelope"]).release == 1


def test_a_completed_targeted_rollout_is_still_not_sent_outside_its_audience(fleet) -> None:
    from tests.server.test_rollout_engine import install, metrics

    client, services = fleet
    rid = create(client, {"hardware_classes": ["cam-v2"]}).json()["id"]
    approve(client, rid)
    install(services, CAM_V2, rid, 2)
    for d in CAM_V2:
        metrics(services, d, 2, labelled=40, correct=37, rollout_id=rid)
    for d in CAM_V1:
        metrics(services, d, 1, labelled=100, correct=92)
    services.ingest.drain()
    for step in (1, 2):
        services.rollouts.tick(services.clock() + timedelta(seconds=step))
    r = client.get(f"/api/v1/rollouts/{rid}").json()
    assert r["state"] == "completed", r
    line = client.get(f"/api/v1/model-lines/{LINE}").json()
    assert (line["champion_version"], line["current_release"]) == (2, 2)
    for d in CAM_V2:
        assert verified(services, target(client, d)["envelope"]).release == 2
    # The line's current release admits only cam-v2: the others keep the release they run.
    for d in CAM_V1:
        m = verified(services, target(client, d)["envelope"])
        assert (m.release, m.model_version) == (1, 1)
    enroll(client, "old-late", LINE, hardware="cam-v1")
    assert verified(services, target(client, "old-late")["envelope"]).release == 1
