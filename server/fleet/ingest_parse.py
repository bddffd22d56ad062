"""Reading one device report for the ingest writer: keep what can be used, say what was dropped.

Pure: a payload (MQTT bytes, an HTTP body, or a report object) and the topic's device id in, an
``Accepted`` report or a ``Refusal`` out; ``classify`` never raises, whatever the input.

The contract's ``from_dict`` refuses a whole message for one bad field. For a status report that
would lose a device's refusal because of an absurd value in a field the agent echoed from an
unsigned target message, so status reports are read field by field here: a field of the wrong type
or outside what the database holds is dropped (``None``, or the server's receive time for ``ts``)
and named in ``Accepted.dropped``. Only a report the server cannot use at all (not JSON, not an
object, nested too deeply, another device's id, no valid state) is refused; the refusal keeps a
bounded, printable excerpt of the payload for the operator.

Metrics reports are figures summed by the rollout gates, so they stay all-or-nothing (one bad count
refuses the report); only their optional ``rollout_id`` is dropped when out of range.

Monitor summaries (``contract.monitoring.MonitorSummary``) are all-or-nothing too: parsed by the
contract (its own size, depth, signal and bin bounds), then held to what the database stores.
Whether their bins fit the model's reference is the ingest writer's check (it needs the model).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract import DeviceState, MessageError, MetricsReport, StatusReport
from contract.messages import MAX_MESSAGE_BYTES, MAX_REASON_CHARS, MAX_ROLLOUT_ID
from contract.monitoring import MonitorSummary
from contract.topics import valid_device_id

MAX_INT32 = 2**31 - 1  # versions and releases: INTEGER columns on PostgreSQL
MAX_INT64 = MAX_ROLLOUT_ID  # rollout ids: BIGINT columns (the contract's one limit)
MAX_COUNT = 2**62  # metrics counts (BIGINT), with headroom for SQL sums
MAX_TS = 2.0**33  # unix seconds (year 2242): a later device clock is absurd
MAX_LINE_CHARS = 64  # characters of a model line name (model_lines.name)
MAX_EXCERPT_CHARS = 512  # characters of a refused payload kept for the operator
MAX_REFUSAL_CHARS = 500  # characters of a refusal's reason
MAX_INT_DIGITS = 64  # digits of a JSON integer converted to an int; longer ones are HUGE

KINDS = ("status", "metrics", "monitor")
# Control characters (C0 and C1) an operator's terminal or the database should not get; tab and
# newline stay. Lone surrogates (JSON "\ud800") cannot be encoded as UTF-8 by any DB driver.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# A model line name as the server accepts one (schemas.Name); anything else names no line.
_LINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STATES = {s.value: s for s in DeviceState}


@dataclass(frozen=True)
class Oversize:
    """A payload over ``MAX_MESSAGE_BYTES``: the bridge queues its size and head, never all."""

    size: int  # bytes of the whole payload
    head: bytes  # its first MAX_EXCERPT_CHARS bytes

    @classmethod
    def of(cls, payload: bytes | bytearray) -> Oversize:
        return cls(size=len(payload), head=bytes(payload[:MAX_EXCERPT_CHARS]))


@dataclass(frozen=True)
class Accepted:
    """A report to store; ``dropped`` names each field left out and why."""

    kind: str  # "status", "metrics" or "monitor"
    report: StatusReport | MetricsReport | MonitorSummary
    dropped: tuple[str, ...] = ()

    @property
    def device_id(self) -> str:
        return self.report.device_id


@dataclass(frozen=True)
class Refusal:
    """A message the server cannot use, kept for the operator under the topic's device."""

    kind: str
    device_id: str  # the topic's (the payload's cannot be trusted)
    reason: str  # at most MAX_REFUSAL_CHARS, printable
    excerpt: str  # at most MAX_EXCERPT_CHARS, printable
    size: int | None  # bytes of the payload as received; None when it came parsed


class HugeInteger:
    """A JSON integer of more than ``MAX_INT_DIGITS`` digits: out of range for every field, and
    never converted (``int()`` of thousands of digits is slow, and refused past 4300)."""

    def __repr__(self) -> str:
        return "HUGE"


HUGE = HugeInteger()


def _parse_int(text: str) -> int | HugeInteger:
    return int(text) if len(text) <= MAX_INT_DIGITS else HUGE


class _Unusable(Exception):
    """Internal: the report cannot be used at all (the text says why)."""


def printable(text: str, limit: int) -> tuple[str, int]:
    """``text`` cut to ``limit`` characters with control characters and lone surrogates
    replaced by U+FFFD; returns it and how many were replaced."""
    cut = text[:limit]
    clean, n = _UNPRINTABLE.subn("\ufffd", cut)
    return clean, n


def classify(
    kind: str, topic_device: str, payload: Any, *, received_ts: float
) -> Accepted | Refusal:
    """Read one queued report. Never raises.

    Args:
        kind: the topic's kind, "status", "metrics" or "monitor".
        topic_device: the device id in the topic (or the HTTP path): the only trusted one.
        payload: raw bytes/str, a parsed JSON value, an ``Oversize``, a report, or ``Accepted``.
        received_ts: the server's receive time (unix seconds), used when ``ts`` is dropped.

    Returns:
        ``Accepted`` (maybe with fields dropped) or ``Refusal``.
    """
    try:
        if isinstance(payload, Accepted):
            accepted = payload
        elif kind == "monitor":
            accepted = _monitor(payload)
        else:
            if isinstance(payload, StatusReport | MetricsReport):
                payload = payload.to_dict()  # re-checked like any other source
            data = _as_object(payload)
            if kind == "status":
                accepted = _status(data, received_ts)
            elif kind == "metrics":
                accepted = _metrics(data)
            else:
                raise _Unusable(f"unknown report kind {kind[:32]!r}")
        if accepted.device_id != topic_device:
            raise _Unusable(
                f"payload device_id {accepted.device_id!r} does not match the topic's "
                f"{topic_device!r}"
            )
        return accepted
    except _Unusable as exc:
        why = str(exc)
    except RecursionError:
        why = "message is nested too deeply"
    except Exception as exc:  # noqa: BLE001 - any input must end as a refusal, never a crash
        why = f"unreadable {kind[:32]} message ({type(exc).__name__}: {exc})"
    return Refusal(
        kind=kind[:16],
        device_id=topic_device,
        reason=printable(why, MAX_REFUSAL_CHARS)[0],
        excerpt=excerpt(payload),
        size=_size(payload),
    )


def excerpt(payload: Any) -> str:
    """A bounded, printable excerpt of any payload (never raises)."""
    try:
        if isinstance(payload, Oversize):
            text = payload.head.decode("utf-8", "replace")
        elif isinstance(payload, bytes | bytearray | memoryview):
            text = bytes(payload[: MAX_EXCERPT_CHARS * 4]).decode("utf-8", "replace")
        elif isinstance(payload, str):
            text = payload[:MAX_EXCERPT_CHARS]
        elif isinstance(payload, Accepted):
            text = payload.report.to_json().decode("utf-8", "replace")
        else:
            text = _bounded_json(payload)
    except Exception as exc:  # noqa: BLE001 - an excerpt is best effort
        text = f"<{type(payload).__name__}: {type(exc).__name__}>"
    return printable(text, MAX_EXCERPT_CHARS)[0]


def _bounded_json(value: Any) -> str:
    """JSON text of ``value`` cut short: containers past depth 8 or 64 items are elided."""
    out: list[str] = []
    budget = [MAX_EXCERPT_CHARS]

    def emit(s: str) -> None:
        out.append(s)
        budget[0] -= len(s)

    def walk(v: Any, depth: int) -> None:
        if budget[0] <= 0:
            return
        if isinstance(v, Mapping | list | tuple) and depth >= 8:
            emit("...")
        elif isinstance(v, Mapping):
            emit("{")
            for i, (k, item) in enumerate(v.items()):
                if i >= 64 or budget[0] <= 0:
                    emit("...")
                    break
                emit(("," if i else "") + json.dumps(str(k)[:MAX_EXCERPT_CHARS]) + ":")
                walk(item, depth + 1)
            emit("}")
        elif isinstance(v, list | tuple):
            emit("[")
            for i, item in enumerate(v):
                if i >= 64 or budget[0] <= 0:
                    emit("...")
                    break
                emit("," if i else "")
                walk(item, depth + 1)
            emit("]")
        elif isinstance(v, str):
            emit(json.dumps(v[:MAX_EXCERPT_CHARS]))
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**30:
            emit(f"<int of {v.bit_length()} bits>")
        elif v is HUGE:
            emit("<huge integer>")
        elif v is None or isinstance(v, bool | int | float):
            emit(json.dumps(v))
        else:
            emit(f"<{type(v).__name__}>")

    walk(value, 0)
    return "".join(out)


def _size(payload: Any) -> int | None:
    if isinstance(payload, Oversize):
        return payload.size
    if isinstance(payload, bytes | bytearray | memoryview | str):
        return len(payload)
    return None


def _as_object(payload: Any) -> Mapping[str, Any]:
    if isinstance(payload, Oversize):
        raise _Unusable(f"message is {payload.size} bytes, limit {MAX_MESSAGE_BYTES}")
    if isinstance(payload, bytes | bytearray | memoryview | str):
        if len(payload) > MAX_MESSAGE_BYTES:
            raise _Unusable(f"message is {len(payload)} bytes, limit {MAX_MESSAGE_BYTES}")
        try:
            text = bytes(payload) if isinstance(payload, memoryview) else payload
            payload = json.loads(text, parse_int=_parse_int)
        except RecursionError as exc:
            raise _Unusable("message is nested too deeply") from exc
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many int digits
            raise _Unusable(f"message is not JSON: {exc}") from exc
    if not isinstance(payload, Mapping):
        raise _Unusable(f"message must be a JSON object, got {type(payload).__name__}")
    return payload


def _device_id(data: Mapping[str, Any]) -> str:
    device_id = data.get("device_id")
    if not isinstance(device_id, str) or not valid_device_id(device_id):
        raise _Unusable("device_id is missing or not 1-128 of [A-Za-z0-9._:-]")
    return device_id


def _int(value: Any, low: int, high: int) -> str | None:
    """Why ``value`` is not an int in [low, high]; None if it is."""
    if value is HUGE:
        return "out of range"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"not an integer ({type(value).__name__})"
    if not low <= value <= high:
        return "out of range"
    return None


def _status(data: Mapping[str, Any], received_ts: float) -> Accepted:
    device_id = _device_id(data)
    state = data.get("state")
    if state is None:
        raise _Unusable("the report has no state")
    if not isinstance(state, str):
        raise _Unusable(f"state must be a string, got {type(state).__name__}")
    if state not in _STATES:
        raise _Unusable(f"state {printable(state, 32)[0]!r} is not a device state")
    dropped: list[str] = []

    def optional_int(name: str, high: int) -> int | None:
        value = data.get(name)
        if value is None:
            return None
        why = _int(value, 0, high)
        if why is not None:
            dropped.append(f"dropped {name}: {why}")
            return None
        return int(value)

    line = data.get("model_line")
    if not isinstance(line, str) or not _LINE.fullmatch(line):
        if line is not None:
            dropped.append("dropped model_line: not a model line name")
        line = ""  # unknown: the writer uses the device's registered line

    ts = data.get("ts")
    if ts is None:
        dropped.append("dropped ts: missing (server receive time used)")
        ts = float(received_ts)
    elif ts is HUGE:
        dropped.append("dropped ts: out of range (server receive time used)")
        ts = float(received_ts)
    elif isinstance(ts, bool) or not isinstance(ts, int | float):
        dropped.append("dropped ts: not a number (server receive time used)")
        ts = float(received_ts)
    elif not (isinstance(ts, float) and not math.isfinite(ts)) and 0 <= ts <= MAX_TS:
        ts = float(ts)
    else:
        dropped.append("dropped ts: out of range (server receive time used)")
        ts = float(received_ts)

    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        dropped.append(f"dropped reason: not a string ({type(reason).__name__})")
        reason = None
    elif reason is not None:
        reason, replaced = printable(reason, MAX_REASON_CHARS)
        if replaced:
            dropped.append(f"reason: {replaced} control characters replaced")

    report = StatusReport(
        device_id=device_id,
        ts=ts,
        state=_STATES[state],
        model_line=line,
        model_version=optional_int("model_version", MAX_INT32),
        release=optional_int("release", MAX_INT32),
        rollout_id=optional_int("rollout_id", MAX_INT64),
        target_release=optional_int("target_release", MAX_INT32),
        reason=reason,
    )
    return Accepted("status", report, tuple(dropped))


def _metrics(data: Mapping[str, Any]) -> Accepted:
    _device_id(data)
    dropped: list[str] = []
    rollout_id = data.get("rollout_id")
    if rollout_id is not None and (why := _int(rollout_id, 0, MAX_INT64)) is not None:
        dropped.append(f"dropped rollout_id: {why}")
        data = {k: v for k, v in data.items() if k != "rollout_id"}
    for name, value in data.items():
        if value is HUGE:
            raise _Unusable(f"{printable(str(name), 64)[0]} is out of range")
    try:
        report = MetricsReport.from_dict(data)
    except MessageError as exc:
        raise _Unusable(str(exc)) from exc
    except (ValueError, TypeError, OverflowError) as exc:
        raise _Unusable(f"unparseable metrics message: {exc}") from exc
    _check_metrics(report)
    return Accepted("metrics", report, tuple(dropped))


def _monitor(payload: Any) -> Accepted:
    """A monitor summary, parsed by the contract (bytes with its own size and depth limits)."""
    if isinstance(payload, Oversize):
        _as_object(payload)  # raises: over the message limit
    if isinstance(payload, MonitorSummary):
        payload = payload.to_dict()  # re-checked like any other source
    if isinstance(payload, memoryview):
        payload = bytes(payload)
    try:
        summary = MonitorSummary.from_dict(payload)
    except MessageError as exc:
        raise _Unusable(str(exc)) from exc
    except (ValueError, TypeError, OverflowError) as exc:
        raise _Unusable(f"unparseable monitor summary: {exc}") from exc
    if not 0 <= summary.model_version <= MAX_INT32:
        raise _Unusable("model_version is out of range")
    if summary.release is not None and not 0 <= summary.release <= MAX_INT32:
        raise _Unusable("release is out of range")
    if not (math.isfinite(summary.start) and math.isfinite(summary.end)) or summary.end > MAX_TS:
        raise _Unusable("start and end must be unix seconds before 2242")
    return Accepted("monitor", summary)


def _check_metrics(report: MetricsReport) -> None:
    """Refuse figures the database cannot hold (BIGINT counts, INTEGER versions)."""
    if not _LINE.fullmatch(report.model_line):
        raise _Unusable(f"model_line must be a model line name (1-{MAX_LINE_CHARS} characters)")
    versions = {"model_version": report.model_version}
    counts = {n: getattr(report, n) for n in ("inferences", "errors", "labelled", "correct")}
    if report.shadow is not None:
        versions["shadow.model_version"] = report.shadow.model_version
        for name in ("compared", "labelled", "errors"):
            counts[f"shadow.{name}"] = getattr(report.shadow, name)
    # Other counts are bounded by these (agreed <= compared, correct and per-class counts
    # <= labelled: checked by from_dict).
    for name, value in versions.items():
        if not 0 <= value <= MAX_INT32:
            raise _Unusable(f"{name} is out of range")
    for name, value in counts.items():
        if value > MAX_COUNT:
            raise _Unusable(f"{name} is out of range")
    for name in ("ts", "window_s", "latency_ms_p50", "latency_ms_p95"):
        if not math.isfinite(getattr(report, name)):
            raise _Unusable(f"{name} must be finite")
