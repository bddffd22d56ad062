"""Rollout plans: ordered waves and deterministic wave membership (pure; no DB, no clock).

A plan is a list of waves. A wave takes either a cumulative percentage of the line's devices
(``percent``: 10 -> 50 -> 100 means 10 %, then the next 40 %, then the rest) or the devices that
carry one of the named groups (``selector``). A device belongs to the *first* wave it falls into.

Percent membership uses a stable hash of (rollout id, device id) mapped to ``[0, 1)``. At approval
the engine freezes one cut-off per percent wave, taken from the devices known then, so that a
10 % canary of ten devices is exactly one device; a device that enrolls later is placed by
comparing its hash with those frozen cut-offs, so no wave ever reshuffles and nobody is missed.

A wave's ``kind`` is ``serve`` (install and serve the new model) or ``shadow``: only the first
wave, which then gets a release signed with ``deployment: "shadow"``; its devices run the
challenger beside the champion and keep serving the champion. The serve waves after it get a
separate, higher serve release, and only once the shadow gate held (``server.rollout.gates``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MAX_WAVES = 20
WAVE_KINDS = ("serve", "shadow")


class PlanError(ValueError):
    """A plan that cannot be run (the message says why)."""


@dataclass(frozen=True)
class Abort:
    """Cancel and roll back once ``min_devices`` of the wave settled and ``failure_pct`` of
    the wave's devices failed for good (AWS IoT Jobs abort criteria)."""

    failure_pct: float = 50.0  # percent of the wave's devices
    min_devices: int = 1  # settled devices (committed or finally failed) before it applies


@dataclass(frozen=True)
class Wave:
    """One wave of a plan. Exactly one of ``percent`` and ``selector`` is set."""

    percent: float | None = None  # cumulative percent of the line's devices
    selector: tuple[str, ...] = ()  # device groups; a device with any of them is in
    name: str = ""
    success_pct: float = 90.0  # committed / wave devices needed to move on (hawkBit)
    error_pct: float = 20.0  # finally failed / wave devices above which the rollout pauses
    abort: Abort = field(default_factory=Abort)
    min_soak_s: float = 0.0  # seconds the wave runs the new model after reaching success
    timeout_s: float = 120.0  # seconds without progress before a device is timed out
    manual_gate: bool = False  # an approver must release this wave
    kind: str = "serve"  # "shadow": run the challenger beside the champion (first wave only)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.selector:
            return "groups " + ",".join(self.selector)
        return f"{self.percent:g}%" + (" shadow" if self.kind == "shadow" else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["selector"] = list(self.selector)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], defaults: Wave | None = None) -> Wave:
        """A wave from plain JSON; missing keys come from ``defaults``. Raises PlanError."""
        try:
            return cls._from_dict(data, defaults)
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"invalid wave {dict(data)!r}: {exc}") from exc

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], defaults: Wave | None) -> Wave:
        base = defaults or cls()
        known = {f for f in cls.__dataclass_fields__} | {"label"}
        unknown = set(data) - known
        if unknown:
            raise PlanError(f"unknown wave field(s): {', '.join(sorted(unknown))}")
        abort_in = data.get("abort")
        abort = base.abort
        if abort_in is not None:
            if not isinstance(abort_in, Mapping):
                raise PlanError("abort must be an object")
            abort = Abort(
                failure_pct=float(abort_in.get("failure_pct", base.abort.failure_pct)),
                min_devices=int(abort_in.get("min_devices", base.abort.min_devices)),
            )
        selector = data.get("selector") or ()
        if isinstance(selector, Mapping):
            selector = selector.get("groups") or ()
        if isinstance(selector, str):
            selector = (selector,)
        percent = data.get("percent")
        wave = replace(
            base,
            percent=None if percent is None else float(percent),
            selector=tuple(str(s) for s in selector),
            name=str(data.get("name") or ""),
            kind=str(data.get("kind") or "serve"),
            abort=abort,
            **{
                k: type(getattr(base, k))(data[k])
                for k in ("success_pct", "error_pct", "min_soak_s", "timeout_s", "manual_gate")
                if data.get(k) is not None
            },
        )
        return wave


@dataclass(frozen=True)
class Plan:
    """Ordered waves plus the cut-offs frozen at approval (one per wave; None = selector)."""

    waves: tuple[Wave, ...]
    cutoffs: tuple[float | None, ...] = ()

    def __post_init__(self) -> None:
        validate(self.waves)

    @property
    def last(self) -> int:
        return len(self.waves) - 1

    def to_dict(self) -> dict[str, Any]:
        return {"waves": [w.to_dict() for w in self.waves], "cutoffs": list(self.cutoffs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        waves = tuple(Wave.from_dict(w) for w in data.get("waves", ()))
        cutoffs = tuple(None if c is None else float(c) for c in data.get("cutoffs", ()))
        return cls(waves, cutoffs)

    def frozen(self, rollout_id: int, devices: Mapping[str, Sequence[str]]) -> Plan:
        """This plan with cut-offs computed from ``devices`` (device id -> groups)."""
        return replace(self, cutoffs=compute_cutoffs(self.waves, rollout_id, devices))

    def wave_of(self, rollout_id: int, device_id: str, groups: Sequence[str]) -> int:
        """The first wave ``device_id`` falls into (the last percent wave takes everyone)."""
        h = bucket(rollout_id, device_id)
        cutoffs = self.cutoffs or tuple(
            None if w.percent is None else w.percent / 100 for w in self.waves
        )
        for i, wave in enumerate(self.waves):
            if wave.selector:
                if set(wave.selector) & set(groups):
                    return i
                continue
            cut = cutoffs[i]
            if wave.percent is not None and (wave.percent >= 100 or (cut is not None and h <= cut)):
                return i
        return self.last  # unreachable for a valid plan (the last wave is 100 %)


def validate(waves: Sequence[Wave]) -> None:
    """Raises PlanError unless the plan can cover the whole line in order."""
    if not waves:
        raise PlanError("a plan needs at least one wave")
    if len(waves) > MAX_WAVES:
        raise PlanError(f"a plan has at most {MAX_WAVES} waves")
    last_pct = 0.0
    for i, w in enumerate(waves, 1):
        if (w.percent is None) == (not w.selector):
            raise PlanError(f"wave {i}: set exactly one of percent and selector")
        if w.percent is not None:
            if not 0 < w.percent <= 100:
                raise PlanError(f"wave {i}: percent must be in (0, 100]")
            if w.percent <= last_pct:
                raise PlanError(
                    f"wave {i}: percent {w.percent:g} must exceed the previous wave's "
                    f"{last_pct:g} (percentages are cumulative)"
                )
            last_pct = w.percent
        if w.kind not in WAVE_KINDS:
            raise PlanError(f"wave {i}: kind must be one of: {', '.join(WAVE_KINDS)}")
        if w.kind == "shadow" and (i != 1 or len(waves) == 1):
            raise PlanError(
                f"wave {i}: only the first wave of a plan with later waves may be a shadow wave"
            )
        for name in ("success_pct", "error_pct"):
            if not 0 <= getattr(w, name) <= 100:
                raise PlanError(f"wave {i}: {name} must be in [0, 100]")
        if not 0 <= w.abort.failure_pct <= 100 or w.abort.min_devices < 1:
            raise PlanError(f"wave {i}: abort needs failure_pct in [0, 100] and min_devices >= 1")
        if w.min_soak_s < 0 or w.timeout_s <= 0:
            raise PlanError(f"wave {i}: min_soak_s must be >= 0 and timeout_s > 0")
    if waves[-1].percent != 100:
        raise PlanError("the last wave must be percent 100 so that every device is covered")


def bucket(rollout_id: int, device_id: str) -> float:
    """Stable pseudo-random position of a device in ``[0, 1)``; another one per rollout."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def compute_cutoffs(
    waves: Sequence[Wave], rollout_id: int, devices: Mapping[str, Sequence[str]]
) -> tuple[float | None, ...]:
    """One hash cut-off per percent wave, so wave ``i`` holds ``round(n * percent / 100)``
    devices of the ``n`` known now (at least one for the first percent wave, never fewer than
    the previous wave). Selector waves get None. Without devices the raw percentages serve."""
    ranked = sorted(bucket(rollout_id, d) for d in devices)
    n = len(ranked)
    out: list[float | None] = []
    taken = 0
    for w in waves:
        if w.percent is None:
            out.append(None)
            continue
        if w.percent >= 100:
            out.append(1.0)
            continue
        if n == 0:
            out.append(w.percent / 100)
            continue
        k = max(taken, round(n * w.percent / 100), 1)
        k = min(k, n)
        taken = k
        out.append(ranked[k - 1])
    return tuple(out)


def shorthand(canary_percent: float, defaults: Wave) -> tuple[Wave, ...]:
    """``canary_percent`` as a plan: the canary, then everyone."""
    if canary_percent >= 100:
        return (replace(defaults, percent=100.0, name="all"),)
    return (
        replace(defaults, percent=float(canary_percent), name="canary"),
        replace(defaults, percent=100.0, name="rest"),
    )


def parse_plan_setting(text: str, defaults: Wave) -> tuple[Wave, ...] | None:
    """The ``rollout_plan`` setting: ``"10,50,100"`` or a JSON list of wave objects.

    Returns None for an empty setting. Raises PlanError.
    """
    import json

    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise PlanError(f"rollout plan is not valid JSON: {exc}") from exc
        if not isinstance(raw, list) or not all(isinstance(w, dict) for w in raw):
            raise PlanError("rollout plan must be a list of wave objects")
        waves = tuple(Wave.from_dict(w, defaults) for w in raw)
    else:
        try:
            percents = [float(p) for p in text.split(",")]
        except ValueError as exc:
            raise PlanError(f"rollout plan {text!r} is not a list of percentages") from exc
        waves = tuple(replace(defaults, percent=p) for p in percents)
    validate(waves)
    return waves


def members(plan: Plan, rollout_id: int, devices: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Device id -> wave index, for every device in ``devices`` (id -> groups)."""
    return {d: plan.wave_of(rollout_id, d, g) for d, g in devices.items()}


def groups_of(rows: Iterable[tuple[str, Sequence[str] | None]]) -> dict[str, list[str]]:
    return {d: list(g or ()) for d, g in rows}
