"""The signed capture policy on the device: receive, verify, apply, bound, fall back, report.

The server raises a device group's capture rate of uncertain inputs while a drift alert holds
(``contract.capture_policy``). Here:

- :class:`PolicyInbox` is what paho's network thread hands policy messages to: newest wins per
  topic, at most one item per subscribed topic, and a payload over ``MAX_POLICY_BYTES`` is kept
  as its size only. Nothing here parses, so the network thread cannot be hurt by a message.
- :class:`PolicyKeeper` verifies each message on the agent's ``policy`` worker (signature by the
  release role of the root the device trusts now, payload type, bounds, expiry, line, group,
  ``seq`` above the last applied for that group), persists the applied envelopes atomically
  (re-verified at start) and answers :meth:`PolicyKeeper.should_capture` on the serving path.
  A refused message leaves the applied policy as it was, is counted, kept in ``status`` and
  reported to the server through ``report``; the keeper never raises out of :meth:`offer`.
- :class:`CaptureBudget` is the per-device bound: captures in the last hour and day, limited by
  the smaller of the policy's bounds and the agent's hard maximum (``capture_max_per_hour`` /
  ``capture_max_per_day``), whatever a policy says.

An expired policy simply stops counting: :meth:`PolicyKeeper.effective` falls back to the
agent's configured default (``uncertain_capture_below`` / ``uncertain_capture_rate``, off unless
set) at the first call after ``expires_at``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contract import ContractError
from contract.capture_policy import ALL_GROUPS, MAX_POLICY_BYTES, CapturePolicy, verify_policy
from contract.messages import clean_text
from contract.topics import Topics
from device_agent.config import AgentConfig
from device_agent.store import atomic_write
from device_agent.verify import ReleaseTrust

log = logging.getLogger(__name__)

HOUR_S = 3600.0
DAY_S = 86400.0
MAX_REFUSALS_KEPT = 5  # refusals listed in status (the newest)
STATE_FILE = "capture_policy.json"


@dataclass(frozen=True)
class PolicyItem:
    """One policy message from the network; ``payload`` is None when it was too large."""

    topic: str
    payload: bytes | None
    size: int  # bytes the broker delivered


class PolicyInbox:
    """Policy messages for the ``policy`` worker: newest per topic, bounded by ``max_topics``."""

    def __init__(self, max_topics: int) -> None:
        self._items: dict[str, PolicyItem] = {}
        self._max = max(1, max_topics)
        self._cond = threading.Condition()
        self.dropped = 0  # items replaced before the worker looked, or over the topic bound

    def put(self, topic: str, payload: bytes | bytearray) -> None:
        """Never blocks, never raises; called on paho's network thread."""
        size = len(payload)
        item = PolicyItem(topic, bytes(payload) if size <= MAX_POLICY_BYTES else None, size)
        with self._cond:
            if topic in self._items:
                self.dropped += 1
            elif len(self._items) >= self._max:
                self.dropped += 1
                return
            self._items[topic] = item
            self._cond.notify()

    def take(self, timeout: float) -> list[PolicyItem]:
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            items = list(self._items.values())
            self._items.clear()
            return items


class CaptureBudget:
    """Captures made in the last hour and day (timestamps, at most ``day_cap`` kept)."""

    def __init__(self, day_cap: int) -> None:
        self._times: deque[float] = deque(maxlen=max(1, day_cap))
        self._lock = threading.Lock()

    def try_take(self, now: float, *, per_hour: int, per_day: int) -> bool:
        """Record one capture at ``now`` if both bounds allow it; False if either is spent."""
        with self._lock:
            while self._times and self._times[0] <= now - DAY_S:
                self._times.popleft()
            in_day = len(self._times)
            in_hour = sum(1 for t in self._times if t > now - HOUR_S)
            if in_day >= per_day or in_hour >= per_hour:
                return False
            self._times.append(now)
            return True

    def counts(self, now: float) -> tuple[int, int]:
        with self._lock:
            return (
                sum(1 for t in self._times if t > now - HOUR_S),
                sum(1 for t in self._times if t > now - DAY_S),
            )


@dataclass(frozen=True)
class Effective:
    """The capture rule in force now, already bounded by the agent's hard maximum."""

    uncertain_below: float
    sample_rate: float
    max_per_hour: int
    max_per_day: int
    source: str  # "default" or "group G policy N" (comma-separated when several apply)


class PolicyKeeper:
    """Verifies and holds this device's capture policies (one per group it belongs to).

    Args:
        config: the agent's configuration (line, groups, defaults, hard bounds, state_dir).
        trust: returns the keys that may sign now (the updater's current ``ReleaseTrust``).
        clock: unix seconds.
        report: called with (group or topic, reason) for every refused message; exceptions it
            raises are logged and swallowed.
        rng: uniform [0, 1) draws for the sample rate.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        trust: Callable[[], ReleaseTrust],
        clock: Callable[[], float],
        report: Callable[[str, str], None] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._cfg = config
        self._trust = trust
        self._clock = clock
        self._report = report
        self._rng = rng
        self._lock = threading.Lock()
        self._path = config.state_dir / STATE_FILE
        self._policies: dict[str, CapturePolicy] = {}
        self._envelopes: dict[str, str] = {}  # group -> the applied message (persisted)
        self._seq: dict[str, int] = {}  # group -> highest seq applied
        self.budget = CaptureBudget(config.capture_max_per_day)
        self.applied = 0
        self.refused = 0
        self.captured = 0
        self.refusals: deque[dict[str, str]] = deque(maxlen=MAX_REFUSALS_KEPT)
        self._topics = self._topic_groups()
        self._load()

    # ---- topics ---------------------------------------------------------------------------
    def _topic_groups(self) -> dict[str, str]:
        topics = Topics()
        line = self._cfg.model_line
        out = {topics.capture_policy(line, ALL_GROUPS): ALL_GROUPS}
        for g in self._cfg.groups:
            out[topics.capture_policy(line, g)] = g
        return out

    @property
    def topics(self) -> dict[str, str]:
        """Topic -> group: what the MQTT link subscribes to for this device."""
        return dict(self._topics)

    # ---- receiving ------------------------------------------------------------------------
    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _verify(self, item: PolicyItem, group: str) -> CapturePolicy:
        """Raises ContractError (or ValueError) naming why the message is refused."""
        if item.payload is None:
            raise ContractError(f"{item.size} bytes, limit {MAX_POLICY_BYTES}")
        trust = self._trust()
        policy = verify_policy(
            item.payload,
            trust.keys,
            threshold=trust.threshold,
            now=self._now(),
            skew_s=self._cfg.clock_skew_s,
        )
        if policy.model_line != self._cfg.model_line:
            raise ContractError(
                f"policy is for model line {policy.model_line!r}, this device serves "
                f"{self._cfg.model_line!r}"
            )
        if policy.group != group:
            raise ContractError(
                f"policy for group {policy.group!r} arrived on the topic of group {group!r}"
            )
        last = self._seq.get(group, -1)
        if policy.seq <= last:
            raise ContractError(
                f"policy {policy.seq} for group {group!r} is not newer than policy {last} "
                "already applied (replay)"
            )
        return policy

    def offer(self, item: PolicyItem) -> CapturePolicy | None:
        """Verify and apply one message; None when refused (counted, kept, reported) or when
        the retained policy was cleared (empty payload). Never raises."""
        group = self._topics.get(item.topic)
        if group is None:
            self._refuse(item.topic[:200], "not a capture-policy topic of this device")
            return None
        if item.payload == b"":  # the server cleared the retained policy: back to default
            with self._lock:
                self._policies.pop(group, None)
                self._envelopes.pop(group, None)
            self._save()
            return None
        try:
            policy = self._verify(item, group)
        except ContractError as exc:
            self._refuse(group, str(exc))
            return None
        except Exception as exc:  # a parser bug must cost one message, never the worker
            log.exception("capture policy for group %s broke the verifier", group)
            self._refuse(group, f"{type(exc).__name__}: {exc}")
            return None
        assert item.payload is not None
        with self._lock:
            self._policies[group] = policy
            self._envelopes[group] = item.payload.decode("utf-8")
            self._seq[group] = policy.seq
            self.applied += 1
        self._save()
        log.info(
            "capture policy %d for group %s applied (raised=%s, below %.2f, rate %.2f, until %s)",
            policy.seq,
            group,
            policy.raised,
            policy.uncertain_below,
            policy.sample_rate,
            policy.expires_at.isoformat(),
        )
        return policy

    def _refuse(self, group: str, reason: str) -> None:
        reason = clean_text(f"capture policy refused: {reason}", 500)
        log.warning("%s (group %s)", reason, group)
        with self._lock:
            self.refused += 1
            self.refusals.append({"group": group, "reason": reason})
        if self._report is not None:
            try:
                self._report(group, reason)
            except Exception:  # reporting must never break the worker
                log.exception("capture policy refusal could not be reported")

    # ---- persistence ----------------------------------------------------------------------
    def _save(self) -> None:
        with self._lock:
            data = {"seq": dict(self._seq), "policies": dict(self._envelopes)}
        try:
            atomic_write(self._path, json.dumps(data).encode())
        except OSError as exc:  # the policy still applies in memory; the retained copy returns
            log.warning("cannot persist capture policies: %s", exc)

    def _load(self) -> None:
        """Applied policies survive a restart, re-verified (an expired or no longer trusted one
        is dropped); the replay counters survive too."""
        try:
            data = json.loads(Path(self._path).read_text())
            seqs = {str(g): int(n) for g, n in dict(data.get("seq") or {}).items()}
            envelopes = {str(g): str(e) for g, e in dict(data.get("policies") or {}).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return
        self._seq = {g: n for g, n in seqs.items() if g in self._topics.values()}
        by_group = {g: t for t, g in self._topics.items()}
        for group, raw in envelopes.items():
            topic = by_group.get(group)
            if topic is None:
                continue
            seq = self._seq.pop(group, -1)  # verify it as if new, then restore the counter
            try:
                policy = self._verify(PolicyItem(topic, raw.encode(), len(raw)), group)
            except Exception as exc:  # noqa: BLE001 - a stale file must not stop the agent
                log.info("persisted capture policy for group %s dropped: %s", group, exc)
                self._seq[group] = seq
                continue
            self._seq[group] = max(seq, policy.seq)
            self._policies[group] = policy
            self._envelopes[group] = raw

    # ---- applying -------------------------------------------------------------------------
    def effective(self) -> Effective:
        """The rule in force now: the most generous of the unexpired raised policies (a device
        in several drifting groups captures for the worst), else the configured default; in
        both cases bounded by the agent's hard maximum."""
        cfg = self._cfg
        now = self._now()
        with self._lock:
            live = [
                p
                for p in self._policies.values()
                if p.raised and not p.is_expired(now, cfg.clock_skew_s)
            ]
        if live:
            below = max(p.uncertain_below for p in live)
            rate = max(p.sample_rate for p in live)
            per_hour = max(p.max_per_hour for p in live)
            per_day = max(p.max_per_day for p in live)
            source = ", ".join(f"group {p.group} policy {p.seq}" for p in live)
        else:
            below, rate = cfg.uncertain_capture_below, cfg.uncertain_capture_rate
            per_hour, per_day = cfg.capture_max_per_hour, cfg.capture_max_per_day
            source = "default"
        return Effective(
            uncertain_below=below,
            sample_rate=rate,
            max_per_hour=min(per_hour, cfg.capture_max_per_hour),
            max_per_day=min(per_day, cfg.capture_max_per_day),
            source=source,
        )

    def should_capture(self, confidence: float) -> bool:
        """Whether to capture this input unlabelled now (and, if so, it is charged to the
        budget). Cheap: called on the serving path."""
        rule = self.effective()
        if rule.sample_rate <= 0.0 or not confidence < rule.uncertain_below:
            return False
        if self._rng() >= rule.sample_rate:
            return False
        taken = self.budget.try_take(
            self._clock(), per_hour=rule.max_per_hour, per_day=rule.max_per_day
        )
        if taken:
            self.captured += 1
        return taken

    def status(self) -> dict[str, Any]:
        rule = self.effective()
        hour, day = self.budget.counts(self._clock())
        with self._lock:
            policies = {
                g: {
                    "seq": p.seq,
                    "raised": p.raised,
                    "expires_at": p.expires_at.isoformat(),
                    "alert_id": p.alert_id,
                }
                for g, p in self._policies.items()
            }
            refusals = list(self.refusals)
        return {
            "source": rule.source,
            "uncertain_below": rule.uncertain_below,
            "sample_rate": rule.sample_rate,
            "max_per_hour": rule.max_per_hour,
            "max_per_day": rule.max_per_day,
            "captured_last_hour": hour,
            "captured_last_day": day,
            "captured": self.captured,
            "policies": policies,
            "applied": self.applied,
            "refused": self.refused,
            "refusals": refusals,
        }


__all__ = ["CaptureBudget", "Effective", "PolicyInbox", "PolicyItem", "PolicyKeeper"]
