"""JSON messages exchanged between devices and the server.

Each message is a frozen dataclass with ``to_dict`` and a validating ``from_dict`` that raises
``MessageError`` naming the offending field. The server's pydantic schemas mirror these for the
OpenAPI document; these dataclasses are the source of truth for field names.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from contract._errors import MessageError
from contract.topics import valid_device_id

# Limits on what one message may carry.
MAX_MESSAGE_BYTES = 256 * 1024  # bytes, one MQTT status/metrics message
MAX_TARGET_BYTES = 1024 * 1024  # bytes, one target message (MQTT payload or HTTP poll body)
MAX_JSON_DEPTH = 32  # nesting levels of arrays/objects in any message (real ones use < 8)
MAX_REASON_CHARS = 1000  # characters in a free-text reason
MAX_INPUT_VALUES = 1 << 20  # values in one sample's input tensor
MAX_URL_CHARS = 2048  # characters in an artifact URL
MAX_MODEL_LINE_CHARS = 64  # characters in a model line name (the server's column width)
MAX_ROLLOUT_ID = 2**63 - 1  # highest rollout id: the server's BIGINT id column


class DeviceState(StrEnum):
    """Where a device stands with an update (Mender/AWS IoT Jobs vocabulary)."""

    IDLE = "idle"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    INSTALLED = "installed"  # swapped in and serving
    PROBATION = "probation"  # serving on live traffic, not yet committed; may still roll back
    COMMITTED = "committed"  # kept after its probation window
    ALREADY_INSTALLED = "already_installed"
    REFUSED = "refused"  # failed a signature, hash, size, version or targeting check
    FAILED = "failed"  # transient or runtime failure (download, load)
    ROLLED_BACK = "rolled_back"
    SHADOW = "shadow"  # a shadow release runs beside the serving model (never serves)


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, optional=False):
    if name not in data or data[name] is None:
        if optional:
            return None
        raise MessageError(f"missing field {name!r}")
    value = data[name]
    if (
        isinstance(value, bool)
        and kind is not bool
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise MessageError(f"field {name!r} must be {getattr(kind, '__name__', kind)}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise MessageError(f"field {name!r} must be {names}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MessageError(f"field {name!r} must be finite")
    return value


def _device_id(data: Mapping[str, Any]) -> str:
    device_id = _field(data, "device_id", str)
    if not valid_device_id(device_id):
        raise MessageError("device_id must be 1-128 of [A-Za-z0-9._:-] starting alphanumeric")
    return device_id


# A JSON string (possibly cut off by the end of the input): what the depth scan skips.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
_DEPTH_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects in ``data``, brackets inside strings not counted.

    A linear scan that never recurses, so it is safe on hostile input; it never under-counts
    what a JSON parser would descend into (invalid JSON may over-count, which only refuses it).
    """
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.translate(_DEPTH_STEPS), dtype=np.int8)
    return max(0, int(np.cumsum(steps, dtype=np.int64).max()))


def loads_bounded(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
    what: str = "message",
) -> Any:
    """Parse JSON only after checking its size (bytes) and nesting depth.

    Raises:
        MessageError: over a limit, not UTF-8, or not JSON (numbers too long to convert
            included); never RecursionError or another foreign error.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise MessageError(f"{what} is {len(raw)} bytes, limit {max_bytes}")
    try:
        # UTF-8 only (RFC 8259): its multi-byte sequences hold no ASCII byte, so the byte scan
        # below sees the very quotes and brackets the parser will.
        text = data if isinstance(data, str) else raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    depth = json_depth(raw)
    if depth > max_depth:
        raise MessageError(f"{what} nests {depth} levels deep, limit {max_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits
        raise MessageError(f"{what} is not JSON: {str(exc)[:200]}") from exc


def _as_mapping(data: Any, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Mapping[str, Any]:
    if isinstance(data, bytes | bytearray | memoryview | str):
        data = loads_bounded(data, max_bytes=max_bytes)
    if not isinstance(data, Mapping):
        raise MessageError("message must be a JSON object")
    return data


def bounded_id(value: Any, *, high: int = MAX_ROLLOUT_ID) -> int | None:
    """``value`` if it is an int in 0..``high``, else None: for copying a field the signature
    does not cover into a report (a value the server cannot store must not cost the report)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high:
        return value
    return None


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def clean_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters with control characters and lone surrogates
    replaced by U+FFFD: free text built from hostile input (a reason quoting a keyid) must be
    storable as it is (PostgreSQL TEXT refuses NUL and invalid UTF-8)."""
    return _UNPRINTABLE.sub("\ufffd", text[:limit])


_MODEL_LINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_URL = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces or controls


def _model_line(d: Mapping[str, Any]) -> str:
    line = _field(d, "model_line", str)
    if not _MODEL_LINE.fullmatch(line):
        raise MessageError(
            f"model_line must be 1-{MAX_MODEL_LINE_CHARS} of [A-Za-z0-9._-] starting alphanumeric"
        )
    return line


def _artifact_url(d: Mapping[str, Any]) -> str:
    url = _field(d, "artifact_url", str)
    if len(url) > MAX_URL_CHARS or not _URL.fullmatch(url):
        raise MessageError(
            f"artifact_url must be 1-{MAX_URL_CHARS} printable ASCII characters without spaces"
        )
    return url  # only a hint: the fetcher refuses a scheme it does not speak


def _rollout_id(d: Mapping[str, Any]) -> int | None:
    value = _field(d, "rollout_id", int, optional=True)
    if value is not None and bounded_id(value) is None:
        raise MessageError(f"rollout_id must be 0..{MAX_ROLLOUT_ID}")
    return value


MAX_TARGET_ROOTS = 256  # root envelopes one target message may carry


def _roots(d: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    roots = _field(d, "roots", list, optional=True) or []
    if len(roots) > MAX_TARGET_ROOTS or not all(isinstance(r, dict) for r in roots):
        raise MessageError(f"field 'roots' must be a list of at most {MAX_TARGET_ROOTS} objects")
    return tuple(dict(r) for r in roots)


@dataclass(frozen=True)
class TargetMessage:
    """Server -> device: run this signed release. ``artifact_url`` is only a hint.

    ``roots`` carries root metadata envelopes newer than version 1 (see contract.trust): a
    device applies the ones newer than its trusted root before verifying ``envelope``, which is
    how online keys rotate without touching devices. Empty for a server without a root chain.
    """

    model_line: str
    envelope: dict[str, Any]  # SignedEnvelope.to_dict(); the device verifies it
    artifact_url: str
    rollout_id: int | None = None
    roots: tuple[dict[str, Any], ...] = ()  # root envelopes (SignedEnvelope.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roots"] = [dict(r) for r in self.roots]
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any) -> TargetMessage:
        """Validate every field, the unsigned ones (``model_line``, ``artifact_url``,
        ``rollout_id``) included: they end up in logs, requests and reports. Bytes or str are
        parsed with ``MAX_TARGET_BYTES`` and ``MAX_JSON_DEPTH``. Raises MessageError."""
        d = _as_mapping(data, max_bytes=MAX_TARGET_BYTES)
        return cls(
            model_line=_model_line(d),
            envelope=dict(_field(d, "envelope", dict)),
            artifact_url=_artifact_url(d),
            rollout_id=_rollout_id(d),
            roots=_roots(d),
        )


@dataclass(frozen=True)
class StatusReport:
    """Device -> server: a step of an update, or the state it settled in."""

    device_id: str
    ts: float  # unix seconds, device clock
    state: DeviceState
    model_line: str
    model_version: int | None  # the model the device serves right now
    release: int | None  # highest release the device has accepted
    rollout_id: int | None = None
    target_release: int | None = None  # the release this report is about
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any) -> StatusReport:
        d = _as_mapping(data)
        state = _field(d, "state", str)
        try:
            state_enum = DeviceState(state)
        except ValueError as exc:
            allowed = ", ".join(s.value for s in DeviceState)
            raise MessageError(f"state {state!r} is not one of: {allowed}") from exc
        reason = _field(d, "reason", str, optional=True)
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS]
        return cls(
            device_id=_device_id(d),
            ts=float(_field(d, "ts", (int, float))),
            state=state_enum,
            model_line=_field(d, "model_line", str),
            model_version=_field(d, "model_version", int, optional=True),
            release=_field(d, "release", int, optional=True),
            rollout_id=_field(d, "rollout_id", int, optional=True),
            target_release=_field(d, "target_release", int, optional=True),
            reason=reason,
        )


MAX_CLASS_ENTRIES = 1024  # per-class entries one metrics report may carry
MAX_CLASS_INDEX = 1 << 16  # highest class index (labels are output positions)
_CLASS_KEYS = ("label", "support", "correct")


@dataclass(frozen=True)
class ClassCount:
    """Labelled traffic of one class: ``support`` samples of it, ``correct`` of them right, and
    ``predicted`` labelled inputs the model put in this class (for precision; 0 from agents
    that do not count it)."""

    label: int  # index of the class in the manifest's labels
    support: int
    correct: int
    predicted: int = 0


def _class_counts(d: Mapping[str, Any], name: str) -> tuple[ClassCount, ...]:
    """Parse ``[{"label", "support", "correct"}, ...]``: bounded, unique labels, correct <=
    support. Absent or null: no per-class counts (older agents)."""
    raw = _field(d, name, list, optional=True)
    if raw is None:
        return ()
    if len(raw) > MAX_CLASS_ENTRIES:
        raise MessageError(f"field {name!r} holds {len(raw)} entries, limit {MAX_CLASS_ENTRIES}")
    out: list[ClassCount] = []
    seen: set[int] = set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise MessageError(f"{name}[{i}] must be an object with label, support, correct")
        try:
            label, support, correct = (_field(entry, k, int) for k in _CLASS_KEYS)
            predicted = _field(entry, "predicted", int, optional=True) or 0
        except MessageError as exc:
            raise MessageError(f"{name}[{i}]: {exc}") from exc
        if not 0 <= label <= MAX_CLASS_INDEX:
            raise MessageError(f"{name}[{i}].label must be 0..{MAX_CLASS_INDEX}")
        if support < 0 or not 0 <= correct <= support or predicted < 0:
            raise MessageError(f"{name}[{i}] needs 0 <= correct <= support and predicted >= 0")
        if label in seen:
            raise MessageError(f"{name} lists label {label} twice")
        seen.add(label)
        out.append(ClassCount(label, support, correct, predicted))
    return tuple(out)


def _check_class_totals(
    name: str, counts: tuple[ClassCount, ...], labelled: int, correct: int
) -> None:
    if (
        sum(c.support for c in counts) > labelled
        or sum(c.correct for c in counts) > correct
        or sum(c.predicted for c in counts) > labelled
    ):
        raise MessageError(f"{name} add up to more than the labelled/correct totals")


@dataclass(frozen=True)
class ShadowFigures:
    """A challenger run beside the serving champion on the same inputs (shadow wave).

    ``compared`` inputs went through both models, ``agreed`` of them with the same argmax;
    ``labelled`` of the compared inputs got ground truth, of which the champion got
    ``champion_correct`` and the challenger ``challenger_correct`` right; per-class counts of
    both on that same labelled traffic."""

    model_version: int  # the challenger
    compared: int
    agreed: int
    labelled: int
    champion_correct: int
    challenger_correct: int
    errors: int = 0  # inputs the challenger failed on (not counted in compared)
    class_counts: tuple[ClassCount, ...] = ()  # the challenger's, on the labelled inputs
    champion_class_counts: tuple[ClassCount, ...] = ()  # the champion's, on the same inputs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_counts"] = [asdict(c) for c in self.class_counts]
        d["champion_class_counts"] = [asdict(c) for c in self.champion_class_counts]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> ShadowFigures:
        if not isinstance(data, Mapping):
            raise MessageError("field 'shadow' must be an object")
        names = ("compared", "agreed", "labelled", "champion_correct", "challenger_correct")
        counts = {k: _field(data, k, int) for k in names}
        errors = _field(data, "errors", int, optional=True) or 0
        if any(v < 0 for v in counts.values()) or errors < 0:
            raise MessageError("shadow counts must be >= 0")
        # ``labelled`` may exceed ``compared``: ground truth can arrive a window after the input.
        if counts["agreed"] > counts["compared"]:
            raise MessageError("shadow agreed must not exceed compared")
        if max(counts["champion_correct"], counts["challenger_correct"]) > counts["labelled"]:
            raise MessageError("shadow correct counts must not exceed labelled")
        classes = _class_counts(data, "class_counts")
        _check_class_totals(
            "shadow.class_counts", classes, counts["labelled"], counts["challenger_correct"]
        )
        champion = _class_counts(data, "champion_class_counts")
        _check_class_totals(
            "shadow.champion_class_counts", champion, counts["labelled"], counts["champion_correct"]
        )
        version = _field(data, "model_version", int)
        if version < 0:
            raise MessageError("shadow.model_version must be >= 0")
        return cls(
            model_version=version,
            errors=errors,
            class_counts=classes,
            champion_class_counts=champion,
            **counts,
        )


@dataclass(frozen=True)
class MetricsReport:
    """Device -> server: live metrics of one model version over one window.

    Optional (older agents omit them): ``class_counts``, the labelled traffic per true class;
    ``shadow``, the figures of a challenger run beside this (serving) version."""

    device_id: str
    ts: float  # unix seconds at the end of the window, device clock
    model_line: str
    model_version: int
    window_s: float  # seconds covered
    inferences: int
    errors: int  # inferences that raised
    labelled: int  # inferences whose ground truth arrived in this window
    correct: int  # of those, how many the model got right
    latency_ms_p50: float
    latency_ms_p95: float
    rollout_id: int | None = None
    class_counts: tuple[ClassCount, ...] = ()
    shadow: ShadowFigures | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_counts"] = [asdict(c) for c in self.class_counts]
        d["shadow"] = self.shadow.to_dict() if self.shadow is not None else None
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any) -> MetricsReport:
        d = _as_mapping(data)
        counts = {k: _field(d, k, int) for k in ("inferences", "errors", "labelled", "correct")}
        if any(v < 0 for v in counts.values()):
            raise MessageError("counts must be >= 0")
        if counts["correct"] > counts["labelled"]:
            raise MessageError("correct must not exceed labelled")
        if counts["errors"] > counts["inferences"]:
            raise MessageError("errors must not exceed inferences")
        p50 = float(_field(d, "latency_ms_p50", (int, float)))
        p95 = float(_field(d, "latency_ms_p95", (int, float)))
        window = float(_field(d, "window_s", (int, float)))
        if p50 < 0 or p95 < 0 or window <= 0:
            raise MessageError("latencies must be >= 0 and window_s > 0")
        classes = _class_counts(d, "class_counts")
        _check_class_totals("class_counts", classes, counts["labelled"], counts["correct"])
        shadow_raw = d.get("shadow")
        shadow = ShadowFigures.from_dict(shadow_raw) if shadow_raw is not None else None
        return cls(
            class_counts=classes,
            shadow=shadow,
            device_id=_device_id(d),
            ts=float(_field(d, "ts", (int, float))),
            model_line=_field(d, "model_line", str),
            model_version=_field(d, "model_version", int),
            window_s=window,
            latency_ms_p50=p50,
            latency_ms_p95=p95,
            rollout_id=_field(d, "rollout_id", int, optional=True),
            **counts,
        )


def encode_input(x: np.ndarray) -> str:
    """Base64 of the little-endian float32 bytes of one sample's input."""
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")


def decode_input(b64: str, expected_values: int) -> np.ndarray:
    """Inverse of ``encode_input``; checks the value count. Raises MessageError."""
    if expected_values > MAX_INPUT_VALUES:
        raise MessageError(f"input of {expected_values} values exceeds {MAX_INPUT_VALUES}")
    if len(b64) > (expected_values * 4 * 4) // 3 + 8:
        raise MessageError(f"input is longer than {expected_values} float32 values")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError("input is not valid base64") from exc
    if len(raw) != expected_values * 4:
        raise MessageError(
            f"input holds {len(raw) // 4} float32 values, the model line expects {expected_values}"
        )
    return np.frombuffer(raw, dtype="<f4")


@dataclass(frozen=True)
class SampleRecord:
    """Device -> server (HTTP): one captured sample the model got wrong or was unsure of.

    ``true_label`` is None for an input captured unlabelled under a capture policy: it waits in
    the server's labelling queue. When the device learns the ground truth later it sends the
    same ``sample_id`` again with the label, which fills it (label source ``device``).
    """

    sample_id: str  # globally unique (uuid4 hex); makes uploads idempotent
    device_id: str
    model_line: str
    model_version: int
    input_b64: str  # encode_input(x)
    true_label: int | None  # None: captured without a label (labelling queue)
    predicted_label: int
    confidence: float  # top-class probability, 0..1
    captured_at: float  # unix seconds, device clock

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
