"""Property-based: generated garbage on each network channel of a real agent never ends a worker.

Each test starts one real agent (real store, ONNX Runtime, HTTP client against the real local test
server, root-pinned trust) and reuses it across examples. The payloads go in through the very
paths the network uses: paho's ``on_message`` callback for the MQTT target topic, the HTTP
target poll, and the artifact download from a server whose raw status line, headers and body
are generated; a smaller number go through a real Mosquitto. After every example the agent must
have reported a settled state whose fields the server can store; at the end no worker died,
the agent still answers inferences, and the next genuine signed release installs and serves.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.messages import MAX_TARGET_BYTES, StatusReport, TargetMessage
from contract.topics import Topics
from firmware_sim.services import Mosquitto
from tests.device_agent.agent_testkit import (
    FakeServer,
    make_manifest,
    make_model,
    wait_until,
)
from tests.device_agent.hostile_kit import (
    Harness,
    assert_storable,
    envelope_with_payload,
    hostile_payloads,
    json_values,
    nested,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@pytest.fixture
def harness(tmp_path, fake_server: FakeServer) -> Iterator[Harness]:
    h = Harness(tmp_path / "state", fake_server)
    yield h
    h.close()


def test_mqtt_target_topic_survives_generated_garbage(harness: Harness) -> None:
    """Non-JSON, truncations, deep nesting, huge numbers, wrong types, 5 MB: each is refused
    with a reason (REFUSED), nothing ends the update worker, the next release installs."""

    @SETTINGS
    @given(payload=hostile_payloads(harness.genuine))
    def feed(payload: bytes) -> None:
        report = harness.feed_and_wait(payload)
        if report is not None:
            assert report.state.value in ("refused", "already_installed"), report
            if report.state.value == "refused":
                assert report.reason

    feed()
    harness.assert_sound()
    harness.install_next_genuine()


def test_each_kind_of_unparseable_target_names_its_reason(harness: Harness) -> None:
    cases = {
        b"not json": "not JSON",
        b'{"model_line": "digits", "envelope"': "not JSON",
        nested(5000, "["): "nests 5000 levels deep",
        b"x" * (5 * 1024 * 1024): f"limit {MAX_TARGET_BYTES}",
        b"[1, 2]": "must be a JSON object",
        json.dumps({**harness.genuine, "rollout_id": 10**40}).encode(): "rollout_id must be",
        json.dumps({**harness.genuine, "rollout_id": -1}).encode(): "rollout_id must be",
        json.dumps({**harness.genuine, "envelope": []}).encode(): "'envelope' must be dict",
        json.dumps({**harness.genuine, "artifact_url": "a b"}).encode(): "artifact_url must",
        json.dumps({**harness.genuine, "model_line": 7}).encode(): "'model_line' must be str",
        b'{"rollout_id": ' + b"9" * 5000 + b"}": "not JSON",
        b"\xff\xfe\x00": "not UTF-8",
    }
    for payload, words in cases.items():
        report = harness.feed_and_wait(payload)
        assert report is not None and report.state.value == "refused", report
        assert report.reason.startswith("invalid target message (mqtt):"), report.reason
        assert words in report.reason, (words, report.reason)
        assert report.rollout_id is None
    harness.assert_sound()
    harness.install_next_genuine()


def test_unsigned_fields_reach_reports_only_within_range(harness: Harness) -> None:
    """A genuine envelope with an in-range rollout id keeps it; the report stays storable."""
    n = len(harness.reports)
    harness.feed_mqtt(json.dumps({**harness.genuine, "rollout_id": 2**62}).encode())
    report = wait_until(lambda: harness.settled_since(n))
    assert report.state.value == "already_installed" and report.rollout_id == 2**62


def test_signed_manifest_and_roots_with_generated_content_are_refused(harness: Harness) -> None:
    """The manifest (signed by the trusted key, so its parser runs) and the root envelopes a
    target carries (parsed before their signatures are checked) hold generated content."""
    manifest = json.loads(make_manifest(make_model(1), release=9, model_version=9).to_payload())
    keys = ["_type", "spec_version", "model_line", "release", "model_version", "artifact"]
    keys += ["input_spec", "labels", "created_at", "expires_at"]
    wrong = json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool) or v < 1)

    def with_manifest(payload: bytes) -> bytes:
        env = envelope_with_payload(harness.trust, payload)
        return json.dumps({**harness.genuine, "envelope": env}).encode()

    def with_roots(roots: Any) -> bytes:
        return json.dumps({**harness.genuine, "roots": roots}).encode()

    root_env = {"payloadType": "application/vnd.edgeloop.root+json", "signatures": []}
    payloads = st.one_of(
        st.builds(
            lambda k, v: with_manifest(json.dumps({**manifest, k: v}).encode()),
            st.sampled_from(keys),
            wrong,
        ),
        st.builds(lambda b: with_manifest(b), st.binary(max_size=200)),
        st.integers(min_value=33, max_value=100_000).map(
            lambda d: with_manifest(nested(d, "{", b"1"))
        ),
        st.lists(json_values.filter(lambda v: isinstance(v, dict)), min_size=1, max_size=3).map(
            with_roots
        ),
        st.builds(
            lambda d, sigs: with_roots([{**root_env, "payload": _b64(nested(d, "[")), **sigs}]),
            st.integers(min_value=1, max_value=100_000),
            st.fixed_dictionaries({}, optional={"signatures": json_values}),
        ),
        st.builds(
            lambda v: with_roots([{**root_env, "payload": _b64(json.dumps(v).encode())}]),
            json_values,
        ),
    )

    @SETTINGS
    @given(payload=payloads)
    def feed(payload: bytes) -> None:
        report = harness.feed_and_wait(payload)
        # Root envelopes that claim no newer version are ignored (TUF): release 1 stands.
        assert report is not None and report.state.value in ("refused", "already_installed")
        assert report.reason or report.state.value == "already_installed"

    feed()
    harness.assert_sound()
    assert harness.agent.status()["trust_root_version"] == 1
    harness.install_next_genuine()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# ---- HTTP: the target poll and the artifact download -------------------------------------------
statuses = st.sampled_from([b"200 OK", b"206 Partial", b"404 No", b"416 R", b"500 E", b"999 ?"])
header_values = st.one_of(
    st.integers(min_value=-5, max_value=2**70).map(lambda n: str(n).encode()),
    st.integers(min_value=19, max_value=6000).map(lambda n: b"9" * n),
    st.sampled_from([b"\xb2", b"1e3", b"bytes 0-1/*", b"bytes x", b" 12", b"", b"0x10"]),
    st.builds(
        lambda a, b, c: b"bytes %d-%d/%d" % (a, b, c),
        st.integers(0, 2**66),
        st.integers(0, 2**66),
        st.integers(0, 2**66),
    ),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
header_names = st.sampled_from(
    [b"Content-Length", b"Content-Range", b"Transfer-Encoding", b"Content-Type", b"X-Junk"]
)


def raw_response(status: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"Connection: close\r\n\r\n" + body


def test_http_target_poll_survives_hostile_responses(tmp_path, fake_server: FakeServer) -> None:
    """The poll (MQTT is down, so the agent polls every 0.2 s) gets generated status lines,
    headers and bodies; a 200 body is refused with a reason, the rest is a failed poll."""
    h = Harness(tmp_path / "state", fake_server)
    path = "/api/v1/devices/dev-1/target"
    try:
        bodies = hostile_payloads(h.genuine, big=False)

        @settings(SETTINGS, max_examples=25)
        @given(
            status=statuses,
            headers=st.lists(st.tuples(header_names, header_values), max_size=3),
            body=bodies,
        )
        def feed(status: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
            polls = sum(1 for e in fake_server.log if e["path"] == path)
            fake_server.raw_responses[path] = raw_response(status, headers, body)
            # Two polls later the first one's answer has been handed to the update worker.
            wait_until(lambda: sum(1 for e in fake_server.log if e["path"] == path) >= polls + 2)
            wait_until(lambda: len(h.agent._inbox) == 0 and not h.agent._updater.busy)

        feed()
        # A well-formed 200 with a hostile body: refused and reported, naming the channel.
        n = len(h.reports)
        fake_server.raw_responses[path] = raw_response(
            b"200 OK", [(b"Content-Length", b"9")], b"not json!"
        )
        report = wait_until(lambda: h.settled_since(n))
        assert report.state.value == "refused" and "(http)" in report.reason, report
        # A Content-Length over the limit: refused unread.
        n = len(h.reports)
        fake_server.raw_responses[path] = raw_response(
            b"200 OK", [(b"Content-Length", b"99999999999")], b"{}"
        )
        report = wait_until(lambda: h.settled_since(n))
        assert f"limit {MAX_TARGET_BYTES}" in report.reason, report
        del fake_server.raw_responses[path]
        h.assert_sound()
        h.install_next_genuine()
    finally:
        h.close()


def test_artifact_download_survives_hostile_headers_and_bytes(
    tmp_path, fake_server: FakeServer
) -> None:
    """A genuine signed target whose artifact host answers with generated status lines,
    Content-Length/Content-Range headers and bodies (the signed bytes cut, padded or
    replaced): refused or failed with a reason each time, never a dead or stuck worker."""
    h = Harness(tmp_path / "state", fake_server, download_retries=0)
    counter = iter(range(10**6))
    try:

        @settings(SETTINGS, max_examples=30)
        @given(
            status=statuses,
            headers=st.lists(st.tuples(header_names, header_values), max_size=3),
            cut=st.integers(min_value=-200, max_value=200),
            junk=st.binary(max_size=64),
        )
        def feed(status: bytes, headers: list[tuple[bytes, bytes]], cut: int, junk: bytes) -> None:
            i = next(counter)
            release = h.agent.status()["highest_release"] + 1
            data = make_model(5000 + i)
            m = make_manifest(data, release=release, model_version=release)
            body = (data[:cut] if cut < 0 else data + junk[:cut]) if cut else junk
            name = f"hostile-{i}"
            fake_server.raw_responses[f"/artifacts/{name}"] = raw_response(status, headers, body)
            t = TargetMessage(
                m.model_line, m.sign([h.trust.k1]).to_dict(), f"{fake_server.url}/artifacts/{name}"
            )
            report = h.feed_and_wait(t.to_json())
            assert report is not None and report.state.value in ("refused", "failed", "committed")
            assert report.reason or report.state.value == "committed"

        feed()
        h.assert_sound()
        h.install_next_genuine()
    finally:
        h.close()


# ---- the same through a real Mosquitto ---------------------------------------------------------
def test_real_broker_delivers_generated_garbage_and_the_agent_keeps_updating(
    tmp_path, broker: Mosquitto, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path / "state", fake_server, mqtt_host=broker.host, mqtt_port=broker.port)
    topics = Topics()
    statuses_seen: queue.Queue[StatusReport] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
    client.on_message = lambda c, u, m: statuses_seen.put(StatusReport.from_dict(m.payload))
    client.connect(broker.host, broker.port)
    client.subscribe(topics.status("dev-1"), qos=1)
    client.loop_start()
    try:
        wait_until(lambda: h.agent.status()["mqtt_connected"], timeout=30)

        @settings(SETTINGS, max_examples=12)
        @given(payload=hostile_payloads(h.genuine).filter(bool))
        def publish(payload: bytes) -> None:
            n = len(h.reports)
            info = client.publish(topics.target("dev-1"), payload, qos=1, retain=True)
            info.wait_for_publish(10)
            report = wait_until(lambda: h.settled_since(n), timeout=30)
            assert report.state.value in ("refused", "already_installed"), report
            # The report left the device through the broker and parses as the server would.
            while True:
                seen = statuses_seen.get(timeout=30)
                assert_storable(seen)
                if seen == report:
                    break

        publish()
        h.assert_sound()
        release = h.agent.status()["highest_release"] + 1
        from tests.device_agent.hostile_kit import genuine_target

        t = genuine_target(h.trust, fake_server, release, seed=7000)
        client.publish(topics.target("dev-1"), t.to_json(), qos=1, retain=True).wait_for_publish(10)
        wait_until(lambda: h.agent.status()["model_version"] == release, timeout=60)
        assert h.predict_version() == release
    finally:
        client.loop_stop()
        client.disconnect()
        h.close()
