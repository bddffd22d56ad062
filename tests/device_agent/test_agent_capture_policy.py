"""The capture policy on the device: verified before it applies, bounded by the agent whatever
it says, dropped at expiry, refused (counted, kept, reported) when forged, expired, oversized,
replayed or for someone else; unlabelled captures and the label that fills them later."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import Topics
from contract.capture_policy import MAX_POLICY_BYTES, CapturePolicy
from device_agent.capture import Capture, PendingPrediction, Spool
from device_agent.capture_policy import PolicyInbox, PolicyItem, PolicyKeeper
from device_agent.metrics import Metrics
from device_agent.verify import ReleaseTrust
from tests.device_agent.agent_testkit import FEATURES, make_config, public_pem

T0 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
TOPICS = Topics()
HALL = TOPICS.capture_policy("digits", "hall-1")
FLEET = TOPICS.capture_policy("digits", "*")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def policy(seq: int, **changes: Any) -> CapturePolicy:
    at = datetime.fromtimestamp(T0, UTC)
    base = CapturePolicy(
        model_line="digits",
        group="hall-1",
        seq=seq,
        issued_at=at,
        expires_at=at + timedelta(hours=1),
        raised=True,
        uncertain_below=0.8,
        sample_rate=1.0,
        max_per_hour=1000,  # far above the agent's hard maximum below
        max_per_day=5000,
        alert_id=1,
        reason="drift",
    )
    return replace(base, **changes)


def item(p: CapturePolicy, key: Ed25519PrivateKey, topic: str = HALL) -> PolicyItem:
    raw = p.sign([key]).to_json()
    return PolicyItem(topic, raw, len(raw))


class Rig:
    def __init__(self, tmp_path: Path, key: Ed25519PrivateKey, **overrides: Any) -> None:
        self.key = key
        self.clock = Clock()
        self.reports: list[tuple[str, str]] = []
        values: dict[str, Any] = {
            "groups": ["hall-1"],
            "capture_max_per_hour": 3,
            "capture_max_per_day": 5,
            **overrides,
        }
        self.config = make_config(tmp_path, key, **values)
        self.keeper = self.make()

    def make(self) -> PolicyKeeper:
        return PolicyKeeper(
            self.config,
            trust=lambda: ReleaseTrust.legacy([public_pem(self.key)]),
            clock=self.clock,
            report=lambda g, r: self.reports.append((g, r)),
            rng=lambda: 0.0,
        )


def test_topics_are_the_line_and_its_groups(tmp_path: Path, signing_key) -> None:
    rig = Rig(tmp_path, signing_key)
    assert rig.keeper.topics == {FLEET: "*", HALL: "hall-1"}
    assert FLEET == "edgeloop/v1/lines/digits/capture"
    assert HALL == "edgeloop/v1/groups/hall-1/lines/digits/capture"


def test_default_captures_nothing_and_a_raised_policy_is_bounded_by_the_agent(
    tmp_path: Path, signing_key
) -> None:
    rig = Rig(tmp_path, signing_key)
    keeper = rig.keeper
    assert keeper.effective().source == "default"
    assert not keeper.should_capture(0.1)  # default rate 0: off
    assert keeper.offer(item(policy(5), signing_key)) is not None
    rule = keeper.effective()
    # The policy asks for 1000 an hour and 5000 a day; the agent's maximum is 3 and 5.
    assert (rule.max_per_hour, rule.max_per_day) == (3, 5)
    assert rule.source == "group hall-1 policy 5"
    assert not keeper.should_capture(0.95)  # confident: not uncertain
    assert [keeper.should_capture(0.5) for _ in range(5)] == [True, True, True, False, False]
    rig.clock.now += 3600.5  # the hour rolled over; the day bound is next
    assert [keeper.should_capture(0.5) for _ in range(3)] == [True, True, False]
    assert keeper.budget.counts(rig.clock.now) == (2, 5)
    assert keeper.status()["captured"] == 5


def test_the_sample_rate_draws(tmp_path: Path, signing_key) -> None:
    rig = Rig(tmp_path, signing_key, capture_max_per_hour=100, capture_max_per_day=100)
    draws = iter([0.1, 0.3, 0.29, 0.9])
    keeper = PolicyKeeper(
        rig.config,
        trust=lambda: ReleaseTrust.legacy([public_pem(signing_key)]),
        clock=rig.clock,
        rng=lambda: next(draws),
    )
    keeper.offer(item(policy(1, sample_rate=0.3), signing_key))
    assert [keeper.should_capture(0.2) for _ in range(4)] == [True, False, True, False]


def test_expiry_falls_back_to_the_default(tmp_path: Path, signing_key) -> None:
    rig = Rig(tmp_path, signing_key, uncertain_capture_below=0.3, uncertain_capture_rate=1.0)
    rig.keeper.offer(item(policy(1), signing_key))
    assert rig.keeper.effective().uncertain_below == 0.8
    rig.clock.now += 3600 + rig.config.clock_skew_s + 1
    rule = rig.keeper.effective()
    assert (rule.source, rule.uncertain_below) == ("default", 0.3)
    assert not rig.keeper.should_capture(0.5) and rig.keeper.should_capture(0.2)


def test_a_default_policy_ends_the_raised_one(tmp_path: Path, signing_key) -> None:
    rig = Rig(tmp_path, signing_key)
    rig.keeper.offer(item(policy(1), signing_key))
    cleared = policy(2, raised=False, uncertain_below=0.0, sample_rate=0.0, max_per_hour=0)
    assert rig.keeper.offer(item(cleared, signing_key)) is not None
    assert rig.keeper.effective().source == "default"


def test_bad_policies_are_refused_reported_and_change_nothing(tmp_path: Path, signing_key) -> None:
    rig = Rig(tmp_path, signing_key)
    keeper = rig.keeper
    assert keeper.offer(item(policy(10), signing_key)) is not None
    forger = Ed25519PrivateKey.generate()
    oversized = PolicyItem(HALL, None, MAX_POLICY_BYTES + 1)
    env = json.loads(policy(11).sign([signing_key]).to_json())
    env["payload"] = env["payload"][:-8] + "AAAAAAA="
    cases = [
        (item(policy(11, sample_rate=1.0), forger), "valid signature"),
        (
            item(policy(11, expires_at=policy(1).issued_at + timedelta(seconds=1)), signing_key),
            "expired at",
        ),
        (oversized, f"{MAX_POLICY_BYTES + 1} bytes, limit {MAX_POLICY_BYTES}"),
        (item(policy(9), signing_key), "not newer than policy 10 already applied (replay)"),
        (item(policy(10), signing_key), "replay"),
        (item(policy(11, model_line="other"), signing_key), "model line 'other'"),
        (item(policy(11, group="hall-2"), signing_key), "arrived on the topic of group 'hall-1'"),
        (
            item(
                policy(11, group="hall-2"), signing_key, TOPICS.capture_policy("digits", "hall-2")
            ),
            "not a capture-policy topic of this device",
        ),
        (PolicyItem(HALL, b"{not json", 9), "not JSON"),
        (PolicyItem(HALL, json.dumps(env).encode(), 10), "signature"),
    ]
    rig.clock.now += 5  # the short-lived one above has expired by now (skew 300 s: +301)
    rig.clock.now += rig.config.clock_skew_s
    for it, why in cases:
        assert keeper.offer(it) is None
        group, reason = rig.reports[-1]
        assert reason.startswith("capture policy refused: ") and why in reason, reason
    assert keeper.refused == len(cases) == len(rig.reports)
    assert keeper.effective().source == "group hall-1 policy 10"  # unchanged
    assert len(keeper.status()["refusals"]) == 5  # the newest kept


def test_applied_policies_survive_a_restart_and_stay_replay_proof(
    tmp_path: Path, signing_key
) -> None:
    rig = Rig(tmp_path, signing_key)
    rig.keeper.offer(item(policy(4), signing_key))
    again = rig.make()
    assert again.effective().source == "group hall-1 policy 4"
    assert again.offer(item(policy(4), signing_key)) is None  # the retained copy, replayed
    assert "replay" in rig.reports[-1][1]
    rig.clock.now += 7200  # expired while the agent was off: dropped at start
    assert rig.make().effective().source == "default"


def test_the_inbox_is_bounded_and_keeps_the_newest_per_topic() -> None:
    inbox = PolicyInbox(max_topics=2)
    inbox.put(HALL, b"a")
    inbox.put(HALL, b"b")
    inbox.put(FLEET, b"c")
    inbox.put("elsewhere", b"d")  # over the bound: dropped
    inbox.put(FLEET, b"x" * (MAX_POLICY_BYTES + 1))  # kept as its size only
    got = {i.topic: (i.payload, i.size) for i in inbox.take(0)}
    assert got == {HALL: (b"b", 1), FLEET: (None, MAX_POLICY_BYTES + 1)}
    assert inbox.dropped == 3 and inbox.take(0) == []


def test_an_uncertain_input_is_captured_unlabelled_and_its_label_follows(
    tmp_path: Path, signing_key
) -> None:
    rig = Rig(tmp_path, signing_key)
    rig.keeper.offer(item(policy(1), signing_key))
    spool = Spool(tmp_path / "spool", batch_max=100, max_bytes=1 << 20)
    metrics = Metrics(device_id="dev-1", model_line="digits", clock=rig.clock)
    cap = Capture(rig.config, spool=spool, metrics=metrics, clock=rig.clock, policy=rig.keeper)
    x = np.linspace(0, 1, FEATURES, dtype=np.float32)
    sid = cap.capture_uncertain(x, label=4, confidence=0.5, model_version=1)
    assert sid and not cap.capture_uncertain(x, label=4, confidence=0.9, model_version=1)
    cap.remember("p-1", PendingPrediction(x, 4, 0.5, 1, captured_id=sid))
    assert cap.feedback("p-1", 4) is True  # right and unsure-but-above-floor: still sent
    spool.seal()
    batch = spool.next_batch()
    assert batch is not None
    records = batch[1]["samples"]
    assert [(r["sample_id"], r["true_label"]) for r in records] == [(sid, None), (sid, 4)]
    assert (cap.unlabelled, cap.labels_filled) == (1, 1)


@pytest.mark.parametrize("field", ["uncertain_capture_rate", "uncertain_capture_below"])
def test_config_bounds(tmp_path: Path, signing_key, field: str) -> None:
    from device_agent.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        make_config(tmp_path, signing_key, **{field: 1.5})
