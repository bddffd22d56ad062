"""The generated Mosquitto password file and ACL, enforced by a real Mosquitto.

The server (TestClient app) enrolls devices and writes ``passwd``/``acl`` into the broker's
config dir; the broker runs with ``allow_anonymous false``. Each "never receives" check is made
without waiting on a clock: the forbidden message is sent first and an allowed one after it on
the same connection, so by the time the allowed one arrives the forbidden one would have too.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from contract import Topics
from firmware_sim.services import Mosquitto
from server.fleet.mqtt_bridge import MqttBridge
from server.identity.auth import check_mosquitto_hash
from server.identity.broker_acl import BrokerUser, render_acl, render_password_file
from server.main import create_app
from tests.authkit import FleetAuth, enroll
from tests.conftest import TEST_ADMIN_TOKEN, poll, write_key_pair
from tests.server.conftest import add_version, create_line, make_settings, services_of

SERVER_USER, SERVER_PASSWORD = "edgeloop-server", "server-secret-for-tests"
TOPICS = Topics()


class Client:
    """A paho MQTT v5 client that records what it receives and every acknowledgement."""

    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        self.c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(list(rcs))
        self.c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.port = port

    def connect(self) -> Any:
        """Connect and return the CONNACK reason code."""
        self.c.connect("127.0.0.1", self.port)
        self.c.loop_start()
        rc = self.connack.get(timeout=30)
        return rc

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=30)

    def subscribe(self, topic: str) -> Any:
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=30)[0]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def world(tmp_path: Path, signing_key) -> Iterator[dict[str, Any]]:
    """A server app that writes the broker files, two enrolled devices, the broker on them."""
    broker_dir = tmp_path / "broker-auth"
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    broker = Mosquitto(tmp_path / "mosquitto", auth_dir=broker_dir)
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path}/edgeloop.db",
        signing_key_path=priv,
        broker_config_dir=broker_dir,
        broker_pid_file=broker.pid_file,
        mqtt_username=SERVER_USER,
        mqtt_password=SERVER_PASSWORD,
    )
    with TestClient(create_app(settings)) as client:
        client.auth = FleetAuth(TEST_ADMIN_TOKEN)
        create_line(client)
        add_version(services_of(client), version=1, status="champion", champion_release=True)
        creds = {}
        for device_id, groups in (("cam-a", ["hall-1"]), ("cam-b", ["hall-2"])):
            creds[device_id] = enroll(client, device_id, "digits", groups=groups)["credential"]
        broker.start()
        clients: list[Client] = []
        try:
            yield {
                "client": client,
                "broker": broker,
                "creds": creds,
                "clients": clients,
                "dir": broker_dir,
            }
        finally:
            for c in clients:
                c.close()
            broker.stop()


def connect(world: dict[str, Any], user: str | None, password: str | None) -> tuple[Client, Any]:
    c = Client(world["broker"].port, user, password)
    world["clients"].append(c)
    return c, c.connect()


def test_generated_files_match_mosquitto_formats(world: dict[str, Any]) -> None:
    passwd = (world["dir"] / "passwd").read_text().splitlines()
    users = dict(line.split(":", 1) for line in passwd)
    assert set(users) == {SERVER_USER, "cam-a", "cam-b"}
    assert check_mosquitto_hash(world["creds"]["cam-a"], users["cam-a"])
    assert check_mosquitto_hash(SERVER_PASSWORD, users[SERVER_USER])
    assert world["creds"]["cam-a"] not in (world["dir"] / "passwd").read_text()
    assert (world["dir"] / "passwd").stat().st_mode & 0o077 == 0
    acl = render_acl([BrokerUser("d1", "h", ("g1",))], server_user="srv")
    assert "user d1\ntopic read edgeloop/v1/devices/d1/target\n" in acl
    assert (
        "topic write edgeloop/v1/devices/d1/status\ntopic write edgeloop/v1/devices/d1/metrics\n"
        in acl
    )
    assert (
        "topic read edgeloop/v1/groups/g1/#\n" in acl
        and "user srv\ntopic readwrite edgeloop/v1/#\n" in acl
    )
    assert render_password_file([], server_user="", server_hash=None) == ""


def test_logins_are_checked_against_the_password_file(world: dict[str, Any]) -> None:
    _, anonymous = connect(world, None, None)
    assert anonymous.is_failure
    _, wrong = connect(world, "cam-a", "not-the-credential")
    assert wrong.is_failure
    _, swapped = connect(world, "cam-a", world["creds"]["cam-b"])
    assert swapped.is_failure
    _, ok = connect(world, "cam-a", world["creds"]["cam-a"])
    assert not ok.is_failure


def test_a_device_writes_only_its_own_topics_and_reads_only_its_own_target(
    world: dict[str, Any],
) -> None:
    server, rc = connect(world, SERVER_USER, SERVER_PASSWORD)
    assert not rc.is_failure
    assert not server.subscribe("edgeloop/v1/devices/+/status").is_failure
    # Retained targets for both devices and a group message for each group.
    server.publish(TOPICS.target("cam-a"), b"target-a", retain=True)
    server.publish(TOPICS.target("cam-b"), b"target-b", retain=True)
    server.publish("edgeloop/v1/groups/hall-2/notice", b"hall-2", retain=True)
    server.publish("edgeloop/v1/groups/hall-1/notice", b"hall-1", retain=True)

    a, rc = connect(world, "cam-a", world["creds"]["cam-a"])
    assert not rc.is_failure
    # Writes: the forged status first, then its own; the server gets only its own.
    a.publish(TOPICS.status("cam-b"), b"forged")
    a.publish(TOPICS.status("cam-a"), b"own")
    topic, payload = server.messages.get(timeout=30)
    assert (topic, payload) == (TOPICS.status("cam-a"), b"own")
    assert server.messages.empty()

    # Reads: Mosquitto 2.0 grants the SUBSCRIBE but checks the ACL on every delivery. The
    # forbidden filters go first; once the allowed retained message arrives, anything the
    # forbidden ones could have delivered would already be queued.
    a.subscribe(TOPICS.target("cam-b"))
    a.subscribe("edgeloop/v1/groups/hall-2/#")
    a.subscribe(TOPICS.target("cam-a"))
    assert a.messages.get(timeout=30) == (TOPICS.target("cam-a"), b"target-a")
    assert a.messages.empty()
    a.subscribe("edgeloop/v1/devices/#")  # a wildcard yields only what it may read
    a.subscribe("edgeloop/v1/groups/hall-1/#")
    got = []
    while not got or got[-1][0] != "edgeloop/v1/groups/hall-1/notice":
        got.append(a.messages.get(timeout=30))
    assert got == [
        (TOPICS.target("cam-a"), b"target-a"),
        ("edgeloop/v1/groups/hall-1/notice", b"hall-1"),
    ]
    assert a.messages.empty()  # never target-b, never hall-2
    # A live server update to cam-b's target is not delivered either; cam-a's is.
    server.publish(TOPICS.target("cam-b"), b"target-b2", retain=True)
    server.publish(TOPICS.target("cam-a"), b"target-a2", retain=True)
    assert a.messages.get(timeout=30) == (TOPICS.target("cam-a"), b"target-a2")


def test_a_device_publishes_monitor_summaries_on_its_own_topic_only(
    world: dict[str, Any],
) -> None:
    """The monitor topic (issue 14) is in each device's rights like status and metrics: a
    summary forged for another device never reaches the server, the device's own does."""
    assert "topic write edgeloop/v1/devices/d1/monitor\n" in render_acl(
        [BrokerUser("d1", "h")], server_user="srv"
    )
    server, rc = connect(world, SERVER_USER, SERVER_PASSWORD)
    assert not rc.is_failure
    assert not server.subscribe(TOPICS.all_monitor).is_failure
    a, rc = connect(world, "cam-a", world["creds"]["cam-a"])
    assert not rc.is_failure
    a.publish(TOPICS.monitor("cam-b"), b"forged summary")
    a.publish(TOPICS.monitor("cam-a"), b"own summary")
    assert server.messages.get(timeout=30) == (TOPICS.monitor("cam-a"), b"own summary")
    assert server.messages.empty()


def test_a_revoked_device_cannot_log_in_and_its_queued_reports_are_dropped(
    world: dict[str, Any],
) -> None:
    client, broker = world["client"], world["broker"]
    services = services_of(client)
    ingest: queue.Queue[Any] = queue.Queue()

    def bridge() -> MqttBridge:
        b = MqttBridge(
            host="127.0.0.1",
            port=broker.port,
            ingest_queue=ingest,
            client_id="edgeloop-server-acl-test",
            shared_group=None,
            username=SERVER_USER,
            password=SERVER_PASSWORD,
            is_revoked=services.revoked_devices.__contains__,
        )
        b.start()
        assert b.connected.wait(30)
        return b

    first = bridge()
    first.stop()  # offline: the broker queues QoS 1 reports for its persistent session
    a, _ = connect(world, "cam-a", world["creds"]["cam-a"])
    b, _ = connect(world, "cam-b", world["creds"]["cam-b"])
    status = {"device_id": "cam-a", "ts": 1.0, "state": "installed", "model_line": "digits"}
    a.publish(TOPICS.status("cam-a"), json.dumps(status).encode())
    b.publish(TOPICS.status("cam-b"), json.dumps({**status, "device_id": "cam-b"}).encode())

    revoked = client.post("/api/v1/devices/cam-a/revoke")
    assert revoked.status_code == 200, revoked.text
    # Files rewritten without cam-a, and the broker told to reload (SIGHUP via the pid file).
    assert "cam-a" not in (world["dir"] / "passwd").read_text()
    assert "user cam-a" not in (world["dir"] / "acl").read_text()

    second = bridge()
    try:
        kind, device_id, _payload, _at = ingest.get(timeout=30)
        assert (kind, device_id) == ("status", "cam-b")
        assert second.stats.revoked == 1 and ingest.empty()
    finally:
        second.stop()

    # Its next login is refused once the broker has re-read the files.
    def refused() -> bool:
        c = Client(broker.port, "cam-a", world["creds"]["cam-a"])
        world["clients"].append(c)
        return bool(c.connect().is_failure)

    poll("the broker to refuse the revoked device", refused, timeout=60)
    # The other device still logs in.
    _, rc = connect(world, "cam-b", world["creds"]["cam-b"])
    assert not rc.is_failure


def test_an_enrollment_whose_broker_rewrite_fails_still_gets_its_credential(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enrollment is committed before the broker files are rewritten: a rewrite that fails
    (e.g. the database is busy) must not turn the reply into a 500, or the device loses a
    credential it can never ask for again. The next rewrite gives it its broker login."""
    from server.api.routes import auth as auth_routes

    client = world["client"]
    real = auth_routes.sync_broker

    def failing(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("database is locked (writer queue)")

    monkeypatch.setattr(auth_routes, "sync_broker", failing)
    cred = enroll(client, "cam-c", "digits")["credential"]
    headers = {"Authorization": f"Bearer {cred}"}
    assert client.get("/api/v1/devices/cam-c/target", headers=headers).status_code == 200
    _, before = connect(world, "cam-c", cred)
    assert before.is_failure  # not in the broker's files yet
    monkeypatch.setattr(auth_routes, "sync_broker", real)
    enroll(client, "cam-d", "digits")  # the next rewrite covers cam-c too
    _, after = connect(world, "cam-c", cred)
    assert not after.is_failure


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(round(s, 6))
        self.now += s


def test_broker_rewrites_are_spaced_and_shared_by_waiting_enrollments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from server.identity import broker_acl

    clock = FakeClock()
    gate = threading.Event()
    writes: list[float] = []

    def write(*_a: Any, **_k: Any) -> None:
        if not writes:
            gate.wait(30)  # the first rewrite is slow: the others queue behind it
        writes.append(clock.now)

    monkeypatch.setattr(broker_acl, "write_broker_config", write)
    monkeypatch.setattr(broker_acl, "reload_broker", lambda _pid: True)
    sync = broker_acl.BrokerSync(min_interval_s=0.25, monotonic=clock.monotonic, sleep=clock.sleep)
    settings = make_settings(tmp_path, "sqlite://", broker_config_dir=tmp_path / "b")
    sessions = _NullSessions()

    first = threading.Thread(target=sync.sync, args=(sessions, settings))
    first.start()
    poll("the first rewrite started", lambda: sessions.opened == 1, timeout=10)
    waiting = [threading.Thread(target=sync.sync, args=(sessions, settings)) for _ in range(5)]
    for t in waiting:
        t.start()
    poll("five enrollments queued", lambda: sync._requested == 6, timeout=10)
    gate.set()
    for t in (first, *waiting):
        t.join(30)
    # One rewrite for the first caller, one shared by the five that arrived during it, spaced
    # by the minimum interval.
    assert sync.writes == 2 and len(writes) == 2
    assert clock.slept == [0.25] and writes[1] - writes[0] == 0.25
    # Later, after the interval: no wait at all.
    clock.now += 10
    sync.sync(sessions, settings)
    assert sync.writes == 3 and clock.slept == [0.25]


class _NullSessions:
    """A session factory whose sessions are never used (write_broker_config is replaced)."""

    def __init__(self) -> None:
        self.opened = 0

    def __call__(self) -> Any:
        import contextlib

        self.opened += 1
        return contextlib.nullcontext(None)


def test_a_burst_of_rewrites_ends_with_one_trailing_reload_after_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto loses a SIGHUP that lands while it reloads; the last rewrite of a burst is
    signalled once more after the burst (seen at 10,000 devices: 55 locked out)."""
    import threading

    from server.identity import broker_acl

    events: list[str] = []
    lock = threading.Lock()

    def write(*_a: Any, **_k: Any) -> None:
        with lock:
            events.append("write")

    def reload(_pid: Path | None) -> bool:
        with lock:
            events.append("reload")
        return True

    monkeypatch.setattr(broker_acl, "write_broker_config", write)
    monkeypatch.setattr(broker_acl, "reload_broker", reload)
    sync = broker_acl.BrokerSync(min_interval_s=0.0, settle_s=0.3)
    settings = make_settings(
        tmp_path, "sqlite://", broker_config_dir=tmp_path / "b", broker_pid_file=tmp_path / "pid"
    )
    for _ in range(3):  # a burst: each rewrite re-arms the trailing reload
        sync.sync(_NullSessions(), settings)
    poll("the trailing reload", lambda: sync.settle_reloads == 1, timeout=30)
    # Exactly one trailing reload, after the last rewrite and its own signal; nothing pending.
    assert events == ["write", "reload"] * 3 + ["reload"]
    assert sync._settle is None

    # Without a pid file there is no broker to signal: no trailing reload is armed.
    quiet = broker_acl.BrokerSync(min_interval_s=0.0, settle_s=0.01)
    quiet.sync(_NullSessions(), make_settings(tmp_path, "sqlite://", broker_config_dir=tmp_path))
    assert quiet._settle is None and quiet.settle_reloads == 0
