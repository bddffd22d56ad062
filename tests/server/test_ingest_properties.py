"""Property-based tests of the server's MQTT ingest (issue 12): whatever a device's topic carries.

Generated garbage, deep nesting, huge numbers, wrong types and truncations go in through the
entry the bridge's ``on_message`` uses (``MqttBridge.handle``) and the real ingest writer, on
SQLite and on the real PostgreSQL; a smaller number go through a real Mosquitto to the real bridge
and writer threads. Each message must end as exactly one of: a stored status report (with each
field out of range dropped and named), a stored metrics report, or a refusal the operator sees
through the device API; nothing may raise; and the device's next genuine report must be processed
(its state visible through the device API).

The expected outcome of each generated message comes from a small oracle written from the rules
(``expect_status``), not from the parser under test.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from contract import DeviceState, Topics
from server.db.fleet import DeviceEvent, DeviceMetric
from server.db.reports import RefusedReport
from server.fleet.mqtt_bridge import MqttBridge
from server.main import create_app
from server.services import Services
from tests.conftest import write_key_pair
from tests.server.conftest import (
    authed_client,
    create_line,
    make_settings,
    register,
    services_of,
    wait_for,
)

DEVICE = "cam-1"
OTHER = "cam-2"  # registered too: its id in cam-1's payload must be refused
LINE = "digits"
TOPICS = Topics()
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
MAX_TS = 2.0**33
STATES = [s.value for s in DeviceState]
INT_FIELDS = {
    "model_version": MAX_INT32,
    "release": MAX_INT32,
    "rollout_id": MAX_INT64,
    "target_release": MAX_INT32,
}
STATUS_FIELDS = ["device_id", "ts", "state", "model_line", "reason", *INT_FIELDS]
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, C1, surrogates
_LINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what the server accepts as a line

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,  # no example database left in the working tree
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# ---------------------------------------------------------------- what a message should become


@dataclass(frozen=True)
class Message:
    """One payload on ``DEVICE``'s topic and what the server must make of it."""

    kind: str  # status/metrics
    payload: bytes
    expect: str  # "status", "metrics" or "refused"
    dropped: frozenset[str] = field(default_factory=frozenset)  # status fields left out

    @property
    def topic(self) -> str:
        return TOPICS.status(DEVICE) if self.kind == "status" else TOPICS.metrics(DEVICE)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def expect_status(d: Any) -> tuple[str, frozenset[str]]:
    """The rules of issue 12 for a status payload already parsed from JSON."""
    if not isinstance(d, dict) or d.get("device_id") != DEVICE:
        return "refused", frozenset()
    if not isinstance(d.get("state"), str) or d["state"] not in STATES:
        return "refused", frozenset()
    dropped: set[str] = set()
    line = d.get("model_line")
    line_ok = isinstance(line, str) and _LINE_NAME.fullmatch(line) is not None
    if line_ok and line != LINE:
        return "refused", frozenset()  # a report about another model line
    if line is not None and not line_ok:
        dropped.add("model_line")
    ts = d.get("ts")
    number = _is_int(ts) or (isinstance(ts, float) and math.isfinite(ts))
    if not (number and 0 <= ts <= MAX_TS):  # type: ignore[operator]
        dropped.add("ts")
    for name, high in INT_FIELDS.items():
        v = d.get(name)
        if v is not None and not (_is_int(v) and 0 <= v <= high):
            dropped.add(name)
    reason = d.get("reason")
    if reason is not None and (not isinstance(reason, str) or _UNPRINTABLE.search(reason[:1000])):
        dropped.add("reason")
    return "status", frozenset(dropped)


def status_message(d: dict[str, Any], text: bytes | None = None) -> Message:
    expect, dropped = expect_status(d)
    return Message("status", text if text is not None else json.dumps(d).encode(), expect, dropped)


def genuine_status(**over: Any) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "ts": 1_700_000_000.0,
        "state": "downloading",
        "model_line": LINE,
        "model_version": 1,
        "release": 1,
        "rollout_id": None,
        "target_release": 2,
        "reason": None,
        **over,
    }


def genuine_metrics(**over: Any) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "ts": 1_700_000_000.0,
        "model_line": LINE,
        "model_version": 1,
        "window_s": 10.0,
        "inferences": 10,
        "errors": 0,
        "labelled": 5,
        "correct": 4,
        "latency_ms_p50": 1.0,
        "latency_ms_p95": 2.0,
        **over,
    }


# ---------------------------------------------------------------- strategies

EDGE_NUMBERS: list[int | float] = [
    -1,
    0,
    MAX_INT32,
    MAX_INT32 + 1,
    MAX_INT64,
    MAX_INT64 + 1,
    10**40,
    -(10**40),
]
EDGE_NUMBERS += [MAX_TS, MAX_TS * 2, 1e308, -0.0, 10**400]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(EDGE_NUMBERS),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Strings an operator's terminal or a database driver should never get raw.
NASTY_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0xDFFF, exclude_categories=()),
    max_size=40,
) | st.sampled_from(["\x00", "\x1b[2J", "a\ud800b", "\udfff", "x" * 1500, "ok\nline\ttab"])
NEAR_MISSES = ["exploded", DEVICE, OTHER, LINE, "digits2", "Digits", "digits\n", " digits", "\x9b"]
ADVERSARIAL = JSON_VALUES | NASTY_TEXT | st.sampled_from(STATES + NEAR_MISSES)


@st.composite
def mutated_status(draw: st.DrawFn) -> Message:
    """A genuine status report with some fields replaced by adversarial values or removed."""
    d = genuine_status(reason=draw(st.none() | st.just("signature refused")))
    for name in draw(st.lists(st.sampled_from(STATUS_FIELDS), min_size=1, max_size=4, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            d.pop(name, None)
        else:
            d[name] = draw(ADVERSARIAL)
    return status_message(d)


@st.composite
def huge_literal_status(draw: st.DrawFn) -> Message:
    """An integer literal longer than Python will convert (4300 digits) in one field."""
    name = draw(st.sampled_from(["ts", *INT_FIELDS]))
    digits = draw(st.integers(65, 6000))
    d = genuine_status(**{name: "HUGE"})
    text = json.dumps(d).replace('"HUGE"', "9" * digits).encode()
    return Message("status", text, "status", frozenset({name}))


@st.composite
def nested_status(draw: st.DrawFn) -> Message:
    """Nesting in a field: shallow is a dropped field, past the parser's depth a refusal."""
    depth = draw(st.sampled_from([1, 10, 200, 5_000, 100_000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    name = draw(st.sampled_from(["reason", "rollout_id", "ts", "extra"]))
    d = genuine_status(**{name: "NEST"})
    nest = opener * depth + "1" + closer * depth
    text = json.dumps(d).replace('"NEST"', nest).encode()
    if depth > 200:
        return Message("status", text, "refused")
    return Message("status", text, "status", frozenset() if name == "extra" else frozenset({name}))


@st.composite
def truncated(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(["status", "metrics"]))
    full = json.dumps(genuine_status() if kind == "status" else genuine_metrics()).encode()
    return Message(kind, full[: draw(st.integers(0, len(full) - 1))], "refused")


@st.composite
def garbage(draw: st.DrawFn) -> Message:
    """Random bytes or random JSON (status: judged by the oracle; metrics: refused)."""
    kind = draw(st.sampled_from(["status", "metrics"]))
    if draw(st.booleans()):
        payload = draw(st.binary(max_size=300))
        try:
            value: Any = json.loads(payload)
        except (ValueError, RecursionError):
            return Message(kind, payload, "refused")
    else:
        value = draw(JSON_VALUES)
        payload = json.dumps(value).encode()
    if kind == "status":
        return status_message(value, payload)
    # Random JSON never holds a whole metrics report; one that names the device still is refused.
    return Message(kind, payload, "refused")


@st.composite
def mutated_metrics(draw: st.DrawFn) -> Message:
    """Metrics are all-or-nothing, except an optional rollout_id out of range (dropped)."""
    if draw(st.booleans()):
        rollout_id = draw(ADVERSARIAL)
        d = genuine_metrics(rollout_id=rollout_id)
        return Message("metrics", json.dumps(d).encode(), "metrics")
    name = draw(
        st.sampled_from(["inferences", "errors", "labelled", "correct", "model_version", "ts"])
    )
    bad: Any = draw(
        st.integers(max_value=-1)
        | st.integers(min_value=2**62 + 1)
        | st.text(max_size=5)
        | st.lists(st.integers(), max_size=2)
        | st.sampled_from([None, True, math.inf, math.nan, 10**400])
    )
    if name == "ts" and _is_int(bad):
        bad = math.inf  # any finite number is a ts a metrics report may carry
    if name == "model_version" and _is_int(bad):
        bad = -1 if bad < 0 else MAX_INT32 + 1 + bad
    return Message("metrics", json.dumps(genuine_metrics(**{name: bad})).encode(), "refused")


def other_device() -> st.SearchStrategy[Message]:
    d = genuine_status(device_id=OTHER)
    return st.just(Message("status", json.dumps(d).encode(), "refused"))


MESSAGES = st.one_of(
    mutated_status(),
    huge_literal_status(),
    nested_status(),
    truncated(),
    garbage(),
    mutated_metrics(),
    other_device(),
)


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/edgeloop.db"
    return str(request.getfixturevalue("pg_url"))


@dataclass
class Fleet:
    client: TestClient
    services: Services
    bridge: MqttBridge
    versions: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def newest(self) -> tuple[int, int, int]:
        """(newest refused id, newest event id, metrics rows) of DEVICE."""
        with self.services.sessions() as s:
            refused = s.scalar(
                select(func.max(RefusedReport.id)).where(RefusedReport.device_id == DEVICE)
            )
            event = s.scalar(
                select(func.max(DeviceEvent.id)).where(DeviceEvent.device_id == DEVICE)
            )
            metrics = s.scalar(
                select(func.count())
                .select_from(DeviceMetric)
                .where(DeviceMetric.device_id == DEVICE)
            )
        return refused or 0, event or 0, metrics or 0

    def since(
        self, before: tuple[int, int, int]
    ) -> tuple[list[RefusedReport], list[DeviceEvent], int]:
        with self.services.sessions() as s:
            refused = s.scalars(
                select(RefusedReport)
                .where(RefusedReport.device_id == DEVICE, RefusedReport.id > before[0])
                .order_by(RefusedReport.id)
            ).all()
            events = s.scalars(
                select(DeviceEvent)
                .where(DeviceEvent.device_id == DEVICE, DeviceEvent.id > before[1])
                .order_by(DeviceEvent.id)
            ).all()
        return list(refused), list(events), self.newest()[2] - before[2]


def _app(tmp_path: Path, url: str, signing_key: Any, **overrides: Any) -> Any:
    priv, _ = write_key_pair(tmp_path / "keys", signing_key)
    return create_app(make_settings(tmp_path, url, signing_key_path=priv, **overrides))


def _enroll(client: TestClient) -> None:
    create_line(client)
    register(client, DEVICE)
    register(client, OTHER)


@pytest.fixture
def fleet(tmp_path: Path, backend_url: str, signing_key: Any) -> Iterator[Fleet]:
    """An app without threads, and a bridge that is never connected: tests call its ``handle``
    (what paho's on_message calls) and drain the ingest queue themselves."""
    # A drain waits batch_wait_s for more messages: the tests queue everything first.
    app = _app(tmp_path, backend_url, signing_key, ingest_batch_wait_s=0.001)
    with authed_client(app) as client:
        _enroll(client)
        services = services_of(client)
        bridge = MqttBridge(host="127.0.0.1", port=1, ingest_queue=services.ingest_queue)
        yield Fleet(client, services, bridge)


def check_outcome(
    fleet: Fleet, message: Message, refused: list, events: list, metrics: int
) -> None:
    """The message became exactly what ``message.expect`` says, visible through the API."""
    assert (len(refused), len(events), metrics) == {
        "refused": (1, 0, 0),
        "status": (0, 1, 0),
        "metrics": (0, 0, 1),
    }[message.expect], (message, [r.reason for r in refused])
    if message.expect == "refused":
        row = fleet.client.get(f"/api/v1/devices/{DEVICE}/refused?limit=1").json()[0]
        assert row["id"] == refused[0].id and row["kind"] == message.kind
        assert 0 < len(row["reason"]) <= 500 and len(row["excerpt"]) <= 512
        assert not _UNPRINTABLE.search(row["reason"] + row["excerpt"])
    elif message.expect == "status":
        (event,) = events
        shown = fleet.client.get(f"/api/v1/devices/{DEVICE}/events?limit=50").json()
        (api_event,) = [e for e in shown if e["id"] == event.id]
        assert _named(api_event["dropped"]) == message.dropped, (message, api_event["dropped"])
        for name in INT_FIELDS:
            if name in message.dropped:
                assert api_event[name] is None
        assert not _UNPRINTABLE.search(api_event["reason"] or "")
        assert 0 <= api_event["ts"] <= MAX_TS


def _named(notes: list[str] | None) -> frozenset[str]:
    """The field names in a stored event's notes ("dropped ts: ...", "reason: ... replaced")."""
    return frozenset(n.removeprefix("dropped ").split(":")[0] for n in notes or [])


def genuine_next(fleet: Fleet) -> int:
    """The device's next genuine report; returns the model version it carries."""
    version = next(fleet.versions)
    fleet.bridge.handle(TOPICS.status(DEVICE), genuine_payload(version))
    return version


def genuine_payload(version: int) -> bytes:
    """The latest ts a report may carry: it wins over any report in the same batch."""
    state = STATES[version % len(STATES)]
    return json.dumps(genuine_status(state=state, model_version=version, ts=MAX_TS)).encode()


def assert_device_shows(client: TestClient, version: int) -> None:
    device = client.get(f"/api/v1/devices/{DEVICE}").json()
    assert device["model_version"] == version
    assert device["state"] == STATES[version % len(STATES)]
    (newest,) = client.get(f"/api/v1/devices/{DEVICE}/events?limit=1").json()
    assert newest["model_version"] == version and newest["dropped"] is None


# ---------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(message=MESSAGES)
def test_every_message_is_stored_as_a_report_or_a_refusal_and_the_next_report_counts(
    fleet: Fleet, message: Message
) -> None:
    before = fleet.newest()
    fleet.bridge.handle(message.topic, message.payload)
    fleet.services.ingest.drain()
    check_outcome(fleet, message, *fleet.since(before))

    version = genuine_next(fleet)
    fleet.services.ingest.drain()
    assert_device_shows(fleet.client, version)
    assert fleet.bridge.stats.errors == 0
    assert fleet.services.ingest.stats.failed_writes == 0


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(messages=st.lists(MESSAGES, min_size=2, max_size=25))
def test_one_batch_stores_each_message_whatever_the_others_hold(
    fleet: Fleet, messages: list[Message]
) -> None:
    before = fleet.newest()
    for m in messages:
        fleet.bridge.handle(m.topic, m.payload)
    version = genuine_next(fleet)
    batches = fleet.services.ingest.stats.batches
    assert fleet.services.ingest.drain() == len(messages) + 1
    assert fleet.services.ingest.stats.batches == batches + 1  # one transaction for all
    refused, events, metrics = fleet.since(before)
    expect = [m.expect for m in messages]
    assert len(refused) == expect.count("refused")
    assert len(events) == expect.count("status") + 1
    assert metrics == expect.count("metrics")
    assert Counter(r.kind for r in refused) == Counter(
        m.kind for m in messages if m.expect == "refused"
    )
    assert Counter(_named(e.dropped) for e in events) == Counter(
        [m.dropped for m in messages if m.expect == "status"] + [frozenset()]
    )
    assert_device_shows(fleet.client, version)


@pytest.fixture
def live(broker: Any, tmp_path: Path, backend_url: str, signing_key: Any) -> Iterator[Fleet]:
    """The app with its real bridge on a real Mosquitto and its ingest writer thread."""
    app = _app(
        tmp_path,
        backend_url,
        signing_key,
        enable_mqtt=True,
        enable_ingest_writer=True,
        mqtt_port=broker.port,
        ingest_batch_wait_s=0.02,
    )
    with authed_client(app) as client:
        _enroll(client)
        services = services_of(client)
        assert services.bridge is not None
        wait_for(services.bridge.connected.is_set, what="bridge connected")
        yield Fleet(client, services, services.bridge)


@pytest.fixture
def device_client(broker: Any) -> Iterator[mqtt.Client]:
    """A plain MQTT client publishing on the device's topics (anonymous test broker)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    yield c
    c.loop_stop()
    c.disconnect()


@settings(PROPERTY_SETTINGS, max_examples=12)
@given(message=MESSAGES)
def test_through_mosquitto_the_bridge_and_writer_survive_and_the_next_report_counts(
    live: Fleet, device_client: mqtt.Client, message: Message
) -> None:
    before = live.newest()
    version = next(live.versions)
    for topic, payload in (
        (message.topic, message.payload),
        (TOPICS.status(DEVICE), genuine_payload(version)),
    ):
        device_client.publish(topic, payload, qos=1).wait_for_publish(10)

    def shown() -> bool:
        device = live.client.get(f"/api/v1/devices/{DEVICE}").json()
        return device["model_version"] == version

    wait_for(shown, what=f"genuine report v{version} visible")
    assert_device_shows(live.client, version)
    refused, events, metrics = live.since(before)
    assert events[-1].model_version == version  # the genuine one, written after the message
    check_outcome(live, message, refused, events[:-1], metrics)
    assert live.bridge.stats.errors == 0 and live.bridge.connected.is_set()
    assert live.services.ingest.running
    assert live.services.ingest.stats.failed_writes == 0
