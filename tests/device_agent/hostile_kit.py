"""Hostile inputs for the agent's network channels (hypothesis strategies) and a harness: a real
agent pinned to a root v1, fed through the very paths the network uses, whose every status
report is recorded and checked to be storable by the server.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from contract.envelope import sign_payload
from contract.messages import (
    MAX_REASON_CHARS,
    MAX_ROLLOUT_ID,
    MAX_TARGET_BYTES,
    StatusReport,
    TargetMessage,
)
from device_agent.agent import Agent
from server.release.trust import new_root
from tests.device_agent.agent_testkit import (
    FEATURES,
    FakeServer,
    make_config,
    make_manifest,
    make_model,
    wait_until,
)

SETTLED = {"refused", "failed", "committed", "already_installed", "rolled_back", "shadow"}
MiB = 1024 * 1024

# ---- strategies --------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
huge_numbers = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63),
    st.sampled_from([10**40, -(10**40), 2**64, 1e308, -0.5, True]),
)


def nested(depth: int, kind: str, inner: bytes = b"0") -> bytes:
    """``depth`` levels of arrays or objects around ``inner`` (built as bytes: json.dumps
    itself recurses)."""
    if kind == "[":
        return b"[" * depth + inner + b"]" * depth
    return b'{"a":' * depth + inner + b"}" * depth


deep_nesting = st.builds(
    nested, st.integers(min_value=33, max_value=200_000), st.sampled_from(["[", "{"])
)
long_number = st.integers(min_value=20, max_value=20_000).map(
    lambda n: b'{"model_line":"digits","rollout_id":' + b"9" * n + b"}"
)
oversized = st.integers(min_value=MAX_TARGET_BYTES + 1, max_value=5 * MiB + 1).map(
    lambda n: b'{"pad":"' + b" " * n + b'"}'
)


def target_variants(genuine: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """A genuine target (as a dict) with one field replaced, removed, nested or truncated."""
    raw = json.dumps(genuine).encode()
    keys = st.sampled_from(["model_line", "envelope", "artifact_url", "rollout_id", "roots"])

    def replaced(key: str, value: Any) -> bytes:
        return json.dumps({**genuine, key: value}).encode()

    def deep_field(key: str, depth: int) -> bytes:
        marker = b'"@@"'
        shell = json.dumps({**genuine, key: "@@"}).encode()
        return shell.replace(marker, nested(depth, "["), 1)

    return st.one_of(
        st.builds(replaced, keys, json_values),
        st.builds(replaced, st.just("rollout_id"), huge_numbers),
        st.builds(replaced, st.just("roots"), st.lists(json_values, max_size=3)),
        st.builds(
            replaced,
            st.just("envelope"),
            st.fixed_dictionaries(
                {"payloadType": json_values, "payload": json_values, "signatures": json_values}
            ),
        ),
        st.builds(deep_field, keys, st.integers(min_value=30, max_value=5000)),
        keys.map(lambda k: json.dumps({x: v for x, v in genuine.items() if x != k}).encode()),
        st.integers(min_value=0, max_value=len(raw) - 1).map(lambda i: raw[:i]),
    )


def hostile_payloads(genuine: dict[str, Any], *, big: bool = True) -> st.SearchStrategy[bytes]:
    """Everything a target topic can carry that is not a genuine, new, signed target."""
    parts = [
        st.binary(max_size=300),
        st.text(max_size=100).map(str.encode),
        json_values.map(lambda v: json.dumps(v).encode()),
        deep_nesting,
        long_number,
        target_variants(genuine),
        st.sampled_from([b"\xff\xfe{}", b'{"model_line":"\xed\xa0\x80"}', b"NaN", b"[]", b"null"]),
    ]
    if big:
        parts.append(oversized)
    return st.one_of(*parts)


# ---- trust and targets -------------------------------------------------------------------------
class Trust:
    """An offline root key and one online (release) key; devices pin root v1."""

    def __init__(self) -> None:
        self.root_key = Ed25519PrivateKey.generate()
        self.k1 = Ed25519PrivateKey.generate()
        now = datetime.now(UTC)
        self.v1 = new_root(
            [self.root_key.public_key()], [self.k1.public_key()], threshold=1, now=now, ttl_days=30
        )
        self.v1_env = self.v1.sign([self.root_key])


def genuine_target(
    trust: Trust, srv: FakeServer, release: int, *, seed: int | None = None
) -> TargetMessage:
    """Release ``release`` of a fresh model (version = release), signed by the release key."""
    data = make_model(seed if seed is not None else release)
    m = make_manifest(data, release=release, model_version=release)
    return TargetMessage(
        model_line=m.model_line,
        envelope=m.sign([trust.k1]).to_dict(),
        artifact_url=srv.add(f"m{release}-{data[-8:].hex()}", data),
    )


def assert_storable(report: StatusReport) -> None:
    """What the server's ingest stores: ints within its columns, a reason without NUL/controls."""
    again = StatusReport.from_dict(report.to_json())
    assert again == report
    assert report.rollout_id is None or 0 <= report.rollout_id <= MAX_ROLLOUT_ID
    for v in (report.model_version, report.release, report.target_release):
        assert v is None or 0 <= v <= 2**31 - 1
    if report.reason is not None:
        assert len(report.reason) <= MAX_REASON_CHARS
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in report.reason)
        report.reason.encode("utf-8")  # no lone surrogate


# ---- the harness -------------------------------------------------------------------------------
class Harness:
    """A started agent serving genuine release 1, with its reports recorded (and checked)."""

    def __init__(self, state_dir: Path, srv: FakeServer, **overrides: Any) -> None:
        self.srv = srv
        self.trust = Trust()
        self.reports: list[StatusReport] = []
        t1 = genuine_target(self.trust, srv, 1)
        srv.target = t1.to_json()
        self.genuine = t1.to_dict()
        values: dict[str, Any] = {
            "server_url": srv.url,
            "trusted_root": self.trust.v1_env.to_json(),
            "trusted_keys": [],
            "target_poll_interval_s": 0.2,
            "update_retry_s": 0.2,
            **overrides,
        }
        self.agent = Agent(make_config(state_dir, self.trust.k1, **values))
        updater = self.agent._updater
        publish = updater._report_fn

        def record(report: StatusReport) -> None:
            assert_storable(report)
            self.reports.append(report)
            publish(report)

        updater._report_fn = record
        self.agent.start()
        assert self.agent.wait_ready(60), self.agent.status()
        wait_until(lambda: self.settled_since(0), timeout=60)

    def close(self) -> None:
        self.agent.stop()

    def settled_since(self, n: int) -> StatusReport | None:
        return next((r for r in self.reports[n:] if r.state.value in SETTLED), None)

    def feed_mqtt(self, payload: bytes) -> None:
        """What paho's network thread does with a message on the target topic."""
        msg = mqtt.MQTTMessage(topic=self.agent._mqtt.target_topic.encode())
        msg.payload = payload
        self.agent._mqtt._on_message(self.agent._mqtt._client, None, msg)

    def feed_and_wait(self, payload: bytes, timeout: float = 30.0) -> StatusReport | None:
        """Feed one payload over the MQTT path; the settled report it caused (None: cleared)."""
        n = len(self.reports)
        self.feed_mqtt(payload)
        if not payload:
            return None
        return wait_until(lambda: self.settled_since(n), timeout=timeout)

    def predict_version(self) -> int:
        x = np.random.default_rng(0).uniform(0, 16, (1, FEATURES)).astype(np.float32)
        return self.agent.predict(x).model_version

    def assert_sound(self) -> None:
        """No worker died, the agent is healthy and still answers inferences."""
        st_ = self.agent.status()
        assert st_["healthy"], st_["workers"]
        assert all(w.get("restarts", 0) == 0 for w in st_["workers"].values()), st_["workers"]
        assert self.predict_version() == st_["model_version"]

    def install_next_genuine(self, timeout: float = 60.0) -> int:
        """Publish the next genuine release over MQTT; it must install and serve."""
        release = self.agent.status()["highest_release"] + 1
        t = genuine_target(self.trust, self.srv, release, seed=1000 + release)
        self.srv.target = t.to_json()  # what the HTTP poll answers from now on, too
        self.feed_mqtt(t.to_json())
        wait_until(lambda: self.agent.status()["model_version"] == release, timeout=timeout)
        wait_until(lambda: self.agent.status()["state"] == "committed", timeout=timeout)
        assert self.predict_version() == release
        return release


def envelope_with_payload(trust: Trust, payload: bytes) -> dict[str, Any]:
    """``payload`` signed by the trusted release key (a manifest the signature vouches for)."""
    return sign_payload(payload, [trust.k1]).to_dict()
