"""Identities and rights over real HTTP handling (TestClient) on SQLite and PostgreSQL.

Operators: viewer < operator < approver < admin, four-eyes, tokens issued by an admin.
Devices: enrollment with a one-time bootstrap token, a credential that speaks only for its own
device id, revocation refused everywhere.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from server.core.config import Settings
from server.core.errors import ConfigError
from server.db.fleet import DeviceEvent
from server.db.identity import DeviceCredential, EnrollmentToken, OperatorToken
from server.db.sample_store import Sample
from server.main import create_app
from tests.authkit import FleetAuth, bootstrap_token
from tests.conftest import TEST_ADMIN_TOKEN, auth_headers
from tests.server.conftest import (
    add_version,
    create_line,
    make_settings,
    register,
    sample,
    services_of,
)


def operator_token(client: TestClient, name: str, role: str) -> dict[str, str]:
    """Headers of a fresh operator token (issued by the admin)."""
    resp = client.post("/api/v1/operators/tokens", json={"name": name, "role": role})
    assert resp.status_code == 201, resp.text
    return auth_headers(resp.json()["token"])


@pytest.fixture
def fleet(client: TestClient) -> TestClient:
    """A line with a champion and a candidate, and two enrolled devices cam-a, cam-b."""
    create_line(client)
    add_version(services_of(client), version=1, status="champion", champion_release=True)
    add_version(services_of(client), version=2, status="candidate")
    register(client, "cam-a")
    register(client, "cam-b")
    return client


def creds(client: TestClient, device_id: str) -> dict[str, str]:
    auth = client.auth
    assert isinstance(auth, FleetAuth)
    return auth_headers(auth.devices[device_id])


def status_body(device_id: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "ts": 1.0,
        "state": "installed",
        "model_line": "digits",
        "model_version": 1,
        "release": 1,
    }


def metrics_body(device_id: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "ts": 2.0,
        "model_line": "digits",
        "model_version": 1,
        "window_s": 10.0,
        "inferences": 10,
        "errors": 0,
        "labelled": 5,
        "correct": 4,
        "latency_ms_p50": 1.0,
        "latency_ms_p95": 2.0,
    }


# ---------------------------------------------------------------- operators and roles


def test_requests_without_or_with_a_bad_token_are_401(fleet: TestClient) -> None:
    for headers in (
        {"Authorization": ""},
        auth_headers("not-a-token"),
        {"Authorization": "Basic x"},
    ):
        resp = fleet.get("/api/v1/rollouts", headers=headers)
        assert resp.status_code == 401, resp.text
        assert resp.json()["detail"]
    # Open on purpose: liveness, Prometheus, the public key, signed artifacts.
    for path in ("/healthz", "/metrics", "/api/v1/signing-key"):
        assert fleet.get(path, headers={"Authorization": ""}).status_code == 200, path
    me = fleet.get("/api/v1/auth/me").json()
    assert me == {"name": "admin", "role": "admin"}


def test_a_rollout_waits_for_approval_and_only_an_approver_may_approve(fleet: TestClient) -> None:
    viewer = operator_token(fleet, "vera", "viewer")
    operator = operator_token(fleet, "otto", "operator")
    approver = operator_token(fleet, "alice", "approver")
    assert fleet.get("/api/v1/auth/me", headers=viewer).json() == {"name": "vera", "role": "viewer"}

    body = {"model_line": "digits", "model_version": 2}
    assert fleet.post("/api/v1/rollouts", json=body, headers=viewer).status_code == 403
    created = fleet.post("/api/v1/rollouts", json=body, headers=operator)
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["state"] == "pending_approval" and rollout["created_by"] == "otto"
    rid = rollout["id"]

    denied = fleet.post(f"/api/v1/rollouts/{rid}/approve", json={}, headers=viewer)
    assert denied.status_code == 403
    assert "vera has role viewer" in denied.json()["detail"]
    assert "needs approver" in denied.json()["detail"]
    assert fleet.post(f"/api/v1/rollouts/{rid}/approve", headers=operator).status_code == 403
    still = fleet.get(f"/api/v1/rollouts/{rid}", headers=viewer)
    assert still.status_code == 200 and still.json()["state"] == "pending_approval"
    assert still.json()["approved_by"] is None

    ok = fleet.post(f"/api/v1/rollouts/{rid}/approve", headers=approver)
    assert ok.status_code == 200, ok.text
    assert ok.json()["state"] == "canary" and ok.json()["approved_by"] == "alice"

    # Pause/abort are operator actions; a viewer cannot take them; names come from the token.
    assert fleet.post(f"/api/v1/rollouts/{rid}/pause", headers=viewer).status_code == 403
    spoof = fleet.post(f"/api/v1/rollouts/{rid}/pause", json={"by": "alice"}, headers=operator)
    assert spoof.status_code == 403 and "not the authenticated operator" in spoof.json()["detail"]
    paused = fleet.post(f"/api/v1/rollouts/{rid}/pause", headers=operator)
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    events = fleet.get(f"/api/v1/rollouts/{rid}/events", headers=viewer).json()
    assert {"otto", "alice"} <= {e["by"] for e in events}


def test_four_eyes_rule_stops_the_creator_approving(tmp_path, db_url, signing_key) -> None:
    from tests.conftest import write_key_pair

    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(tmp_path, db_url, signing_key_path=priv, four_eyes=True)
    with TestClient(create_app(settings)) as client:
        client.auth = FleetAuth(TEST_ADMIN_TOKEN)
        create_line(client)
        add_version(services_of(client), version=1, status="champion", champion_release=True)
        add_version(services_of(client), version=2, status="candidate")
        alice = operator_token(client, "alice", "approver")
        bob = operator_token(client, "bob", "approver")
        rid = client.post(
            "/api/v1/rollouts", json={"model_line": "digits", "model_version": 2}, headers=alice
        ).json()["id"]
        own = client.post(f"/api/v1/rollouts/{rid}/approve", headers=alice)
        assert own.status_code == 403
        assert "four-eyes rule: alice created rollout" in own.json()["detail"]
        assert client.get(f"/api/v1/rollouts/{rid}").json()["state"] == "pending_approval"
        other = client.post(f"/api/v1/rollouts/{rid}/approve", headers=bob)
        assert other.status_code == 200 and other.json()["approved_by"] == "bob"


def test_operator_tokens_are_admin_only_hashed_and_revocable(fleet: TestClient) -> None:
    approver = operator_token(fleet, "alice", "approver")
    refused = fleet.post(
        "/api/v1/operators/tokens", json={"name": "eve", "role": "admin"}, headers=approver
    )
    assert refused.status_code == 403
    assert (
        fleet.post("/api/v1/operators/tokens", json={"name": "x", "role": "root"}).status_code
        == 422
    )
    issued = fleet.post("/api/v1/operators/tokens", json={"name": "tmp", "role": "viewer"}).json()
    with services_of(fleet).sessions() as s:
        stored = s.scalars(select(OperatorToken.token_hash)).all()
    assert issued["token"] not in stored and len(stored) == 2  # only sha256 hashes are kept
    listed = fleet.get("/api/v1/operators/tokens").json()
    assert "token" not in listed[0] and {t["name"] for t in listed} == {"alice", "tmp"}
    assert fleet.get("/api/v1/auth/me", headers=auth_headers(issued["token"])).status_code == 200
    revoked = fleet.post(f"/api/v1/operators/tokens/{issued['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    after = fleet.get("/api/v1/auth/me", headers=auth_headers(issued["token"]))
    assert after.status_code == 401 and "revoked" in after.json()["detail"]


def test_production_refuses_to_start_without_an_admin_token(tmp_path) -> None:
    base = dict(
        database_url=f"sqlite:///{tmp_path}/x.db", data_dir=tmp_path, environment="production"
    )
    with pytest.raises(ConfigError, match="EDGELOOP_ADMIN_TOKEN"):
        create_app(Settings(**base))
    with pytest.raises(ConfigError, match="EDGELOOP_ADMIN_TOKEN"):
        create_app(Settings(**base, admin_token="edgeloop-dev-admin-token"))


# ---------------------------------------------------------------- devices


def test_a_device_credential_cannot_act_as_another_device(fleet: TestClient) -> None:
    a = creds(fleet, "cam-a")
    services = services_of(fleet)
    # Its own device: accepted.
    assert (
        fleet.post("/api/v1/devices/cam-a/status", json=status_body("cam-a"), headers=a).status_code
        == 202
    )
    assert fleet.get("/api/v1/devices/cam-a/target", headers=a).status_code == 200
    # Another device: refused, naming both.
    for method, path, body in (
        ("post", "/api/v1/devices/cam-b/status", status_body("cam-b")),
        ("post", "/api/v1/devices/cam-b/metrics", metrics_body("cam-b")),
        ("get", "/api/v1/devices/cam-b/target", None),
        ("post", "/api/v1/devices/register", {"device_id": "cam-b", "model_line": "digits"}),
        ("post", "/api/v1/samples", {"samples": [sample("cam-b", sample_id="forged")]}),
        (
            "post",
            "/api/v1/samples",
            {"samples": [sample("cam-a", sample_id="mine"), sample("cam-b", sample_id="theirs")]},
        ),
    ):
        kw: dict[str, Any] = {"headers": a} if body is None else {"headers": a, "json": body}
        resp = getattr(fleet, method)(path, **kw)
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["detail"] == "device cam-a cannot act as device cam-b"
    # Its own path with another device's body is refused too (the body must match the path).
    mixed = fleet.post("/api/v1/devices/cam-a/status", json=status_body("cam-b"), headers=a)
    assert mixed.status_code == 422
    assert services.ingest.drain() == 1  # only cam-a's own report was queued
    with services.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Sample)) == 0
        assert s.scalars(select(DeviceEvent.device_id)).all() == ["cam-a"]
    # Operators are not devices and devices are not operators.
    admin = auth_headers(TEST_ADMIN_TOKEN)
    assert fleet.get("/api/v1/devices/cam-a/target", headers=admin).status_code == 401
    assert fleet.get("/api/v1/devices", headers=a).status_code == 401
    assert fleet.post("/api/v1/rollouts/1/approve", headers=a).status_code == 401


def test_a_revoked_device_is_refused_everywhere(fleet: TestClient) -> None:
    a = creds(fleet, "cam-a")
    viewer = operator_token(fleet, "vera", "viewer")
    assert fleet.post("/api/v1/devices/cam-a/revoke", headers=viewer).status_code == 403
    assert fleet.post("/api/v1/devices/ghost/revoke").status_code == 404
    revoked = fleet.post("/api/v1/devices/cam-a/revoke")
    assert revoked.status_code == 200 and revoked.json()["device_id"] == "cam-a"
    assert "cam-a" in services_of(fleet).revoked_devices
    for method, path, body in (
        ("post", "/api/v1/devices/cam-a/status", status_body("cam-a")),
        ("post", "/api/v1/devices/cam-a/metrics", metrics_body("cam-a")),
        ("get", "/api/v1/devices/cam-a/target", None),
        ("post", "/api/v1/devices/register", {"device_id": "cam-a", "model_line": "digits"}),
        ("post", "/api/v1/samples", {"samples": [sample("cam-a", sample_id="late")]}),
    ):
        kw: dict[str, Any] = {"headers": a} if body is None else {"headers": a, "json": body}
        resp = getattr(fleet, method)(path, **kw)
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["detail"] == "device cam-a is revoked"
    # A fresh bootstrap token does not bring it back.
    again = fleet.post(
        "/api/v1/devices/enroll",
        json={
            "bootstrap_token": bootstrap_token(fleet),
            "device_id": "cam-a",
            "model_line": "digits",
        },
    )
    assert again.status_code == 403 and "revoked" in again.json()["detail"]
    # The other device is untouched.
    b = creds(fleet, "cam-b")
    assert fleet.get("/api/v1/devices/cam-b/target", headers=b).status_code == 200


def test_a_bootstrap_token_is_one_time_expires_and_pins_line_and_groups(fleet: TestClient) -> None:
    services = services_of(fleet)
    once = fleet.post("/api/v1/enrollment-tokens", json={}).json()
    assert once["max_uses"] == 1
    enroll = {"bootstrap_token": once["token"], "model_line": "digits"}
    first = fleet.post("/api/v1/devices/enroll", json={**enroll, "device_id": "cam-c"})
    assert first.status_code == 201, first.text
    cred = first.json()["credential"]
    assert fleet.get("/api/v1/devices/cam-c/target", headers=auth_headers(cred)).status_code == 200
    reused = fleet.post("/api/v1/devices/enroll", json={**enroll, "device_id": "cam-d"})
    assert reused.status_code == 401 and "used up" in reused.json()["detail"]
    unknown = fleet.post(
        "/api/v1/devices/enroll", json={**enroll, "bootstrap_token": "nope", "device_id": "cam-d"}
    )
    assert unknown.status_code == 401 and "unknown enrollment token" in unknown.json()["detail"]
    # An enrolled device cannot be taken over with another token.
    taken = fleet.post(
        "/api/v1/devices/enroll",
        json={**enroll, "bootstrap_token": bootstrap_token(fleet), "device_id": "cam-c"},
    )
    assert taken.status_code == 409 and "already enrolled" in taken.json()["detail"]

    short = fleet.post("/api/v1/enrollment-tokens", json={"ttl_s": 60, "max_uses": 5}).json()
    real_clock = services.clock
    services.clock = lambda: real_clock() + timedelta(seconds=61)
    try:
        late = fleet.post(
            "/api/v1/devices/enroll",
            json={**enroll, "bootstrap_token": short["token"], "device_id": "cam-e"},
        )
    finally:
        services.clock = real_clock
    assert late.status_code == 401 and "expired" in late.json()["detail"]

    pinned = fleet.post(
        "/api/v1/enrollment-tokens",
        json={"max_uses": 3, "groups": ["hall-a"], "model_line": "digits"},
    ).json()
    wide = fleet.post(
        "/api/v1/devices/enroll",
        json={
            **enroll,
            "bootstrap_token": pinned["token"],
            "device_id": "cam-f",
            "groups": ["hall-b"],
        },
    )
    assert wide.status_code == 403 and "hall-b" in wide.json()["detail"]
    ok = fleet.post(
        "/api/v1/devices/enroll",
        json={**enroll, "bootstrap_token": pinned["token"], "device_id": "cam-f"},
    )
    assert ok.status_code == 201 and ok.json()["device"]["groups"] == ["hall-a"]
    f = auth_headers(ok.json()["credential"])
    widen = fleet.post(
        "/api/v1/devices/register",
        json={"device_id": "cam-f", "model_line": "digits", "groups": ["hall-a", "hall-b"]},
        headers=f,
    )
    assert widen.status_code == 403
    with services.sessions() as s:
        uses = {t.id: t.uses for t in s.scalars(select(EnrollmentToken)).all()}
        hashes = s.scalars(select(DeviceCredential.credential_hash)).all()
    assert uses[once["id"]] == 1 and uses[pinned["id"]] == 1
    assert cred not in hashes  # only hashes are stored


def test_an_enrollment_retried_after_a_lost_reply_gets_a_credential_and_only_it(
    fleet: TestClient,
) -> None:
    """The reply of an enrollment is lost (the device never saw its credential): the retry with
    the same token and the same enroll_secret gets a new credential, and the first one stops
    working. Anyone holding only the bootstrap token is still refused (409), as is the right
    secret with another token; no further use of the token is counted."""
    services = services_of(fleet)
    token = fleet.post("/api/v1/enrollment-tokens", json={"max_uses": 2}).json()
    secret = "s" * 43
    body = {
        "bootstrap_token": token["token"],
        "device_id": "cam-r",
        "model_line": "digits",
        "enroll_secret": secret,
    }
    lost = fleet.post("/api/v1/devices/enroll", json=body)
    assert lost.status_code == 201, lost.text
    retried = fleet.post("/api/v1/devices/enroll", json=body)
    assert retried.status_code == 201, retried.text
    first, second = lost.json()["credential"], retried.json()["credential"]
    assert first != second
    target = "/api/v1/devices/cam-r/target"
    assert fleet.get(target, headers=auth_headers(second)).status_code == 200
    assert fleet.get(target, headers=auth_headers(first)).status_code == 401

    for attempt in (
        {**body, "enroll_secret": "x" * 43},  # the token alone: another device's attempt
        {k: v for k, v in body.items() if k != "enroll_secret"},
        {**body, "bootstrap_token": bootstrap_token(fleet)},  # the secret with another token
    ):
        taken = fleet.post("/api/v1/devices/enroll", json=attempt)
        assert taken.status_code == 409 and "already enrolled" in taken.json()["detail"]
    assert fleet.get(target, headers=auth_headers(second)).status_code == 200
    short = fleet.post("/api/v1/devices/enroll", json={**body, "enroll_secret": "short"})
    assert short.status_code == 422
    with services.sessions() as s:
        uses = s.get(EnrollmentToken, token["id"]).uses
        stored = s.get(DeviceCredential, "cam-r").enroll_secret_hash
    assert uses == 1
    assert stored is not None and secret not in stored  # only its hash is kept


def test_viewer_cannot_mint_enrollment_tokens(fleet: TestClient) -> None:
    viewer = operator_token(fleet, "vera", "viewer")
    assert fleet.post("/api/v1/enrollment-tokens", json={}, headers=viewer).status_code == 403
    assert fleet.post("/api/v1/enrollment-tokens", json={"max_uses": 0}).status_code == 422
    operator = operator_token(fleet, "otto", "operator")
    assert fleet.post("/api/v1/enrollment-tokens", json={}, headers=operator).status_code == 201


def test_identity_changes_are_in_the_audit_log(fleet: TestClient) -> None:
    from server.db import audit

    approver = operator_token(fleet, "alice", "approver")
    rid = fleet.post("/api/v1/rollouts", json={"model_line": "digits", "model_version": 2}).json()[
        "id"
    ]
    assert fleet.post(f"/api/v1/rollouts/{rid}/approve", headers=approver).status_code == 200
    assert fleet.post("/api/v1/devices/cam-b/revoke").status_code == 200
    with services_of(fleet).sessions() as s:
        entries = audit.list_entries(s, limit=1000)
        assert audit.verify(s).ok
    seen = {(e.action, e.subject, e.actor) for e in entries}
    assert ("device.enroll", "device:cam-a", "enrollment:1") in seen
    assert ("token.create", "operator:alice", "admin") in seen
    assert ("rollout.approve", f"rollout:{rid}", "alice") in seen
    assert ("device.revoke", "device:cam-b", "admin") in seen
    # No secret ever reaches the log.
    auth = fleet.auth
    assert isinstance(auth, FleetAuth)
    text = repr([e.public() for e in entries])
    assert all(cred not in text for cred in auth.devices.values())


def test_a_fleet_token_from_settings_enrolls_up_to_its_uses(tmp_path, db_url, signing_key) -> None:
    from tests.conftest import write_key_pair

    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        enrollment_token="fleet-image-token",
        enrollment_token_uses=2,
    )
    with TestClient(create_app(settings)) as client:
        client.auth = FleetAuth(TEST_ADMIN_TOKEN)
        create_line(client)
        codes = [
            client.post(
                "/api/v1/devices/enroll",
                json={
                    "bootstrap_token": "fleet-image-token",
                    "device_id": f"cam-{i}",
                    "model_line": "digits",
                },
            ).status_code
            for i in range(3)
        ]
    assert codes == [201, 201, 401]
    # A restart does not mint it again (its uses stay spent).
    with TestClient(create_app(settings)) as client:
        again = client.post(
            "/api/v1/devices/enroll",
            json={
                "bootstrap_token": "fleet-image-token",
                "device_id": "cam-9",
                "model_line": "digits",
            },
        )
        assert again.status_code == 401 and "used up" in again.json()["detail"]
