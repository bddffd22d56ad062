"""The HTTP auth/ACL endpoint clustered brokers call, over real HTTP (uvicorn, httpx).

Both formats (EMQX 5's HTTP authenticator/authorizer and mosquitto-go-auth's HTTP backend) are
sent exactly as those brokers send them. mosquitto-go-auth is no Debian package and EMQX is not
installed here, so the brokers' side is played by httpx with their request bodies; the rules
behind the answers are the ones the file path enforces on a real Mosquitto
(``tests/test_broker_acl.py``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from server.api.routes.broker import require_broker
from server.core.config import Settings
from server.core.errors import ForbiddenError
from server.identity.broker_rules import (
    Access,
    device_rules,
    filter_within,
    permits,
    server_rules,
)
from server.main import create_app
from tests.authkit import FleetAuth, enroll
from tests.conftest import TEST_ADMIN_TOKEN, write_key_pair
from tests.server.conftest import create_line, make_settings
from tests.server.live_server import LiveServer

SECRET = "broker-secret-for-tests"
SERVER_USER, SERVER_PASSWORD = "edgeloop-server", "server-secret-for-tests"
EMQX = {"Authorization": f"Bearer {SECRET}"}
# mosquitto-go-auth has no header option: its http_host carries user:secret@, which Go's HTTP
# client sends as basic auth.
GOAUTH = {"Authorization": "Basic " + base64.b64encode(f"broker:{SECRET}".encode()).decode()}
P = "edgeloop/v1"


@pytest.fixture
def world(tmp_path: Path, db_url: str, signing_key) -> Iterator[dict[str, Any]]:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    settings = make_settings(
        tmp_path,
        db_url,
        signing_key_path=priv,
        broker_auth_secret=SECRET,
        mqtt_username=SERVER_USER,
        mqtt_password=SERVER_PASSWORD,
    )
    app = create_app(settings)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        admin = httpx.Client(base_url=live.url, auth=FleetAuth(TEST_ADMIN_TOKEN), timeout=30)
        create_line(admin)  # type: ignore[arg-type]  # the same .post()
        creds = {
            d: enroll(admin, d, "digits", groups=[g])["credential"]
            for d, g in (("cam-a", "hall-1"), ("cam-b", "hall-2"))
        }
        yield {"http": http, "admin": admin, "creds": creds, "app": app}
        admin.close()


def emqx_login(w: dict[str, Any], user: str, password: str, clientid: str | None = None) -> Any:
    body = {"username": user, "password": password, "clientid": clientid or user}
    r = w["http"].post("/api/v1/broker/emqx/authn", json=body, headers=EMQX)
    assert r.status_code == 200, r.text
    assert r.json()["is_superuser"] is False
    return r.json()["result"]


def emqx_may(w: dict[str, Any], user: str, action: str, topic: str) -> Any:
    body = {"username": user, "clientid": user, "topic": topic, "action": action}
    r = w["http"].post("/api/v1/broker/emqx/authz", json=body, headers=EMQX)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def goauth_login(w: dict[str, Any], user: str, password: str) -> int:
    body = {"username": user, "password": password, "clientid": user}
    r = w["http"].post("/api/v1/broker/goauth/user", json=body, headers=GOAUTH)
    assert r.json()["ok"] is (r.status_code == 200)
    return int(r.status_code)


def goauth_may(w: dict[str, Any], user: str, acc: int, topic: str) -> int:
    body = {"username": user, "clientid": user, "topic": topic, "acc": acc}
    r = w["http"].post("/api/v1/broker/goauth/acl", json=body, headers=GOAUTH)
    return int(r.status_code)


def test_emqx_allows_a_device_its_own_topics_and_nothing_else(world: dict[str, Any]) -> None:
    a = world["creds"]["cam-a"]
    assert emqx_login(world, "cam-a", a) == "allow"
    assert emqx_login(world, "cam-a", world["creds"]["cam-b"]) == "deny"  # another's secret
    assert emqx_login(world, "cam-a", "wrong") == "deny"
    assert emqx_login(world, "cam-a", "") == "deny"
    assert emqx_login(world, "cam-z", a) == "deny"  # unknown device
    assert emqx_login(world, "cam-a", a, clientid="cam-b") == "deny"  # another's session
    assert emqx_login(world, SERVER_USER, SERVER_PASSWORD) == "allow"
    assert emqx_login(world, SERVER_USER, a) == "deny"

    for action, topic in (
        ("subscribe", f"{P}/devices/cam-a/target"),
        ("publish", f"{P}/devices/cam-a/status"),
        ("publish", f"{P}/devices/cam-a/metrics"),
        ("publish", f"{P}/devices/cam-a/monitor"),
        ("subscribe", f"{P}/groups/hall-1/#"),
        ("subscribe", f"{P}/groups/hall-1/notice"),
    ):
        assert emqx_may(world, "cam-a", action, topic) == "allow", (action, topic)
    for action, topic in (
        ("subscribe", f"{P}/devices/cam-b/target"),  # another device's
        ("publish", f"{P}/devices/cam-b/status"),
        ("publish", f"{P}/devices/cam-a/target"),  # its own target is the server's to write
        ("subscribe", f"{P}/devices/cam-a/status"),
        ("subscribe", f"{P}/devices/+/target"),  # a wildcard reaching other devices
        ("subscribe", f"{P}/#"),
        ("subscribe", f"{P}/groups/hall-2/#"),  # another group
        ("publish", f"{P}/devices/cam-a/+"),  # no topic name
        ("subscribe", f"{P}/devices/cam-a/target/#/x"),  # malformed
        ("subscribe", f"{P}/devices/cam-a/target"),  # as an unknown device, below
    ):
        user = "cam-z" if topic == f"{P}/devices/cam-a/target" else "cam-a"
        assert emqx_may(world, user, action, topic) == "deny", (user, action, topic)
    # The server reads every report, also through an MQTT 5 shared subscription.
    assert emqx_may(world, SERVER_USER, "subscribe", f"$share/g/{P}/devices/+/status") == "allow"
    assert emqx_may(world, SERVER_USER, "publish", f"{P}/devices/cam-b/target") == "allow"
    assert emqx_may(world, SERVER_USER, "subscribe", "other/#") == "deny"


def test_goauth_allows_a_device_its_own_topics_and_nothing_else(world: dict[str, Any]) -> None:
    a = world["creds"]["cam-a"]
    assert goauth_login(world, "cam-a", a) == 200
    assert goauth_login(world, "cam-a", "wrong") == 403
    assert goauth_login(world, "cam-z", a) == 403
    assert goauth_login(world, SERVER_USER, SERVER_PASSWORD) == 200
    r = world["http"].post(
        "/api/v1/broker/goauth/superuser", json={"username": SERVER_USER}, headers=GOAUTH
    )
    assert r.status_code == 403  # nobody skips the ACL
    READ, WRITE, RW, SUBSCRIBE = 1, 2, 3, 4  # noqa: N806 - mosquitto's MOSQ_ACL_* codes
    assert goauth_may(world, "cam-a", SUBSCRIBE, f"{P}/devices/cam-a/target") == 200
    assert goauth_may(world, "cam-a", READ, f"{P}/devices/cam-a/target") == 200
    assert goauth_may(world, "cam-a", WRITE, f"{P}/devices/cam-a/status") == 200
    assert goauth_may(world, "cam-a", READ, f"{P}/groups/hall-1/notice") == 200
    assert goauth_may(world, "cam-a", RW, f"{P}/devices/cam-a/status") == 403  # write only
    assert goauth_may(world, "cam-a", READ, f"{P}/devices/cam-b/target") == 403
    assert goauth_may(world, "cam-a", WRITE, f"{P}/devices/cam-b/status") == 403
    assert goauth_may(world, "cam-a", SUBSCRIBE, f"{P}/devices/#") == 403
    assert goauth_may(world, "cam-a", READ, f"{P}/groups/hall-2/notice") == 403
    assert goauth_may(world, "cam-z", SUBSCRIBE, f"{P}/devices/cam-z/target") == 403
    assert goauth_may(world, "cam-a", 9, f"{P}/devices/cam-a/target") == 403  # unknown code
    assert goauth_may(world, SERVER_USER, RW, f"{P}/devices/cam-b/target") == 200


def test_a_revoked_device_is_refused_at_once(world: dict[str, Any]) -> None:
    a = world["creds"]["cam-a"]
    assert emqx_login(world, "cam-a", a) == "allow"
    assert world["admin"].post("/api/v1/devices/cam-a/revoke").status_code == 200
    assert emqx_login(world, "cam-a", a) == "deny"
    assert emqx_may(world, "cam-a", "publish", f"{P}/devices/cam-a/status") == "deny"
    assert goauth_login(world, "cam-a", a) == 403
    assert goauth_may(world, "cam-a", 2, f"{P}/devices/cam-a/status") == 403
    assert emqx_login(world, "cam-b", world["creds"]["cam-b"]) == "allow"


def test_the_endpoint_wants_the_broker_secret(world: dict[str, Any]) -> None:
    body = {"username": "cam-a", "password": world["creds"]["cam-a"], "clientid": "cam-a"}
    http = world["http"]
    for headers in (
        {},
        {"Authorization": "Bearer not-the-secret"},
        {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"},  # an operator is not a broker
        {"Authorization": "Basic " + base64.b64encode(b"broker:nope").decode()},
        {"Authorization": "Basic !!!"},
    ):
        for path in ("/api/v1/broker/emqx/authn", "/api/v1/broker/goauth/user"):
            r = http.post(path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)


def test_each_check_costs_one_indexed_lookup(world: dict[str, Any]) -> None:
    statements: list[str] = []
    engine = world["app"].state.services.engine

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for call in (
            lambda: emqx_login(world, "cam-a", world["creds"]["cam-a"]),
            lambda: emqx_may(world, "cam-a", "publish", f"{P}/devices/cam-a/status"),
            lambda: goauth_login(world, "cam-z", "x"),
            lambda: goauth_may(world, "cam-a", 4, f"{P}/devices/cam-a/target"),
        ):
            statements.clear()
            call()
            selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
            assert len(selects) == 1, statements
            assert "device_credentials.device_id = " in selects[0]  # the primary key
        statements.clear()
        emqx_login(world, SERVER_USER, SERVER_PASSWORD)  # the server's login: no query
        assert not [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_production_without_a_secret_answers_no_one() -> None:
    """An unset secret leaves the endpoint open in development only; production refuses."""

    class FakeServices:
        settings = Settings(environment="production", broker_auth_secret="")

    class FakeRequest:
        headers: dict[str, str] = {}

    with pytest.raises(ForbiddenError, match="EDGELOOP_BROKER_AUTH_SECRET"):
        require_broker(FakeRequest(), FakeServices())  # type: ignore[arg-type]
    FakeServices.settings = Settings(environment="development", broker_auth_secret="")
    assert require_broker(FakeRequest(), FakeServices()) is not None  # type: ignore[arg-type]


# ---- the pure rules both paths share ----------------------------------------------------------


def test_filter_within_is_mqtt_filter_inclusion() -> None:
    assert filter_within("a/b/c", "a/b/c") and filter_within("a/b/c", "a/+/c")
    assert filter_within("a/b/c", "a/#") and filter_within("a", "a/#")
    assert filter_within("a/+/c", "a/+/c") and filter_within("a/b/#", "a/#")
    assert not filter_within("a/+/c", "a/b/c")  # '+' reaches other values
    assert not filter_within("a/#", "a/+")  # '#' reaches deeper
    assert not filter_within("a/b", "a/b/c") and not filter_within("a/b/c", "a/b")
    assert not filter_within("$SYS/x", "#") and not filter_within("$SYS/x", "+/x")


def test_rules_are_what_the_acl_file_says() -> None:
    rules = device_rules("d1", ("g1",))
    assert permits(rules, Access.read, f"{P}/devices/d1/target")
    assert not permits(rules, Access.write, f"{P}/devices/d1/target")
    assert permits(rules, Access.write, f"{P}/devices/d1/monitor")
    assert not permits(rules, Access.readwrite, f"{P}/devices/d1/monitor")
    assert not permits(rules, Access.read, "")
    assert not permits(rules, Access.read, f"$share/g/{P}/devices/d2/target")
    assert permits(server_rules(), Access.readwrite, f"{P}/devices/d2/target")
    assert not permits(server_rules(), Access.write, f"{P}/devices/+/target")
