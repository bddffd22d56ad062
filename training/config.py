"""A model line's training config: the file an operator writes, checked field by field.

One document (JSON, or TOML read with :mod:`tomllib`) says how a line is trained and gated::

    trainer = "sklearn-mlp"        # sklearn-mlp | sklearn-logreg | torch-cnn | torch-mobilenet
    seed = 0                       # same dataset version + config + seed -> same metrics
    warm_start = false             # start from the champion's weights instead of from scratch
    field_fraction = 0.2           # share of accepted samples held out as the recent-field set
    base = "digits"                # or "imagefolder:/data/parts" (train/ and golden/ folders)
    retrain_threshold = 1000       # optional: accepted samples that trigger a training
    schedule_s = 86400             # optional: also train this often, if new samples arrived
    cooldown_s = 600               # optional: seconds after a training before a threshold job
    retrain_on_alerts = ["drift"]  # optional: alert rules whose raised alert trains the line

    [capture]                      # optional: raise a drifting group's capture of uncertain
    on_alerts = ["drift"]          #   inputs (signed capture policy) while such an alert holds
    uncertain_below = 0.6          # capture inputs whose confidence is below this
    sample_rate = 0.25             # with this probability
    max_per_hour = 30              # per device (the agent also caps it at its own maximum)
    max_per_day = 200
    ttl_s = 3600                   # each signed policy expires after this; renewed while raised

    [hyperparams]                  # overrides of the trainer's defaults
    max_iter = 300

    [gate]                         # champion/challenger bounds (fractions in [0, 1])
    max_golden_drop = 0.03
    min_field_gain = 0.0
    max_macro_f1_drop = 0.05
    max_class_recall_drop = 0.15
    max_class_precision_drop = 0.15
    min_class_count = 20
    max_ece_increase = 0.05

Everything is optional; unknown keys are refused (a misspelt ``hyperparams`` must not silently
train with defaults). Pure: a mapping in, a :class:`LineConfig` out, or :class:`SpecError`.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from training.errors import SpecError
from training.trainers import get_trainer

MAX_CONFIG_BYTES = 256 * 1024  # bytes; a config is a few hundred bytes
MAX_SEED = 2**32 - 1  # numpy / scikit-learn accept seeds in [0, 2**32)
DEFAULT_FIELD_FRACTION = 0.2
IMAGEFOLDER_PREFIX = "imagefolder:"
MAX_ALERT_RULES = 16  # rule names in retrain_on_alerts
_RULE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class GateConfig:
    """Bounds a challenger must respect against the champion (accuracies are fractions)."""

    max_golden_drop: float = 0.03  # golden accuracy may drop at most this much
    min_field_gain: float = 0.0  # field accuracy must gain at least this much (may be < 0)
    max_macro_f1_drop: float = 0.05  # golden macro F1 may drop at most this much
    max_class_recall_drop: float = 0.15  # per class, golden and field recall
    max_class_precision_drop: float = 0.15  # per class, golden and field precision
    min_class_count: int = 20  # per-class rules only judge classes with >= this many examples
    max_ece_increase: float = 0.05  # expected calibration error (15 bins) may rise this much

    @classmethod
    def from_dict(cls, value: Any, where: str = "gate") -> GateConfig:
        """Validate a ``gate`` object; missing keys keep their defaults.

        Raises:
            SpecError: an unknown key or a value out of range, naming it.
        """
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be an object, got {value!r}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(value) - known)
        if extra:
            raise SpecError(f"unknown {where} key(s) {extra}; known: {sorted(known)}")
        out: dict[str, Any] = {}
        for key, v in value.items():
            if key == "min_class_count":
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10**9:
                    raise SpecError(f"{where}.{key} must be an integer >= 1, got {v!r}")
                out[key] = v
                continue
            lo = -1.0 if key == "min_field_gain" else 0.0
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or not lo <= v <= 1.0
            ):
                raise SpecError(f"{where}.{key} must be a number in [{lo:g}, 1], got {v!r}")
            out[key] = float(v)
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CaptureConfig:
    """The capture policy a line's drifting groups get while an alert of ``on_alerts`` holds."""

    on_alerts: tuple[str, ...] = ("drift",)
    uncertain_below: float = 0.6  # top-class confidence below which an input is uncertain
    sample_rate: float = 0.25  # probability of capturing an uncertain input
    max_per_hour: int = 30  # captures per device per rolling hour
    max_per_day: int = 200  # captures per device per rolling day
    ttl_s: float = 3600.0  # seconds each signed policy lives (renewed at half-life)

    @classmethod
    def from_dict(cls, value: Any, where: str = "capture") -> CaptureConfig:
        """Raises SpecError naming an unknown key or a value out of range."""
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be an object, got {value!r}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(value) - known)
        if extra:
            raise SpecError(f"unknown {where} key(s) {extra}; known: {sorted(known)}")
        out: dict[str, Any] = {}
        for key, v in value.items():
            if key == "on_alerts":
                if (
                    not isinstance(v, list | tuple)
                    or not 1 <= len(v) <= MAX_ALERT_RULES
                    or not all(isinstance(a, str) and _RULE_NAME.fullmatch(a) for a in v)
                    or len(set(v)) != len(v)
                ):
                    raise SpecError(
                        f"{where}.on_alerts must list 1-{MAX_ALERT_RULES} distinct alert rule "
                        f"names, got {str(v)[:200]}"
                    )
                out[key] = tuple(v)
            elif key in ("max_per_hour", "max_per_day"):
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10_000:
                    raise SpecError(f"{where}.{key} must be an integer in [0, 10000], got {v!r}")
                out[key] = v
            elif key == "ttl_s":
                if (
                    isinstance(v, bool)
                    or not isinstance(v, int | float)
                    or not 60 <= v <= 7 * 86400
                ):
                    raise SpecError(f"{where}.ttl_s must be 60-604800 seconds, got {v!r}")
                out[key] = float(v)
            else:
                if (
                    isinstance(v, bool)
                    or not isinstance(v, int | float)
                    or not math.isfinite(v)
                    or not 0.0 <= v <= 1.0
                ):
                    raise SpecError(f"{where}.{key} must be a number in [0, 1], got {v!r}")
                out[key] = float(v)
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["on_alerts"] = list(self.on_alerts)
        return out


@dataclass(frozen=True)
class LineConfig:
    """How one model line is trained, gated and triggered."""

    trainer: str = "sklearn-mlp"
    hyperparams: dict[str, Any] = field(default_factory=dict)  # overrides only
    seed: int = 0
    warm_start: bool = False
    field_fraction: float = DEFAULT_FIELD_FRACTION
    base: str = "digits"
    gate: GateConfig = GateConfig()
    retrain_threshold: int | None = None  # None: the server's default
    schedule_s: float | None = None  # None: no scheduled training
    # Seconds after the line's last training ends before a threshold job may start.
    cooldown_s: float | None = None  # None: the server's default (retrain_cooldown_s)
    # Alert rules (the server's ``server.monitoring.rules.Rule`` names, which the server checks)
    # whose raised alert on the line queues a training, a trigger beside the sample threshold.
    retrain_on_alerts: tuple[str, ...] = ()
    # Raised capture policy for a group while one of its alerts holds (None: never raised).
    capture: CaptureConfig | None = None

    @classmethod
    def from_dict(cls, data: Any) -> LineConfig:
        """Validate a parsed config document.

        Raises:
            SpecError: naming the first offending field.
        """
        if not isinstance(data, Mapping):
            raise SpecError("training config must be an object")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise SpecError(f"unknown training config key(s) {extra}; known: {sorted(known)}")
        trainer = data.get("trainer", "sklearn-mlp")
        if not isinstance(trainer, str):
            raise SpecError(f"trainer must be a string, got {trainer!r}")
        hyperparams = data.get("hyperparams") or {}
        if not isinstance(hyperparams, Mapping):
            raise SpecError(f"hyperparams must be an object, got {hyperparams!r}")
        get_trainer(trainer).resolve(hyperparams)  # unknown trainer / bad value -> SpecError
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise SpecError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
        warm = data.get("warm_start", False)
        if not isinstance(warm, bool):
            raise SpecError(f"warm_start must be true or false, got {warm!r}")
        ff = data.get("field_fraction", DEFAULT_FIELD_FRACTION)
        if isinstance(ff, bool) or not isinstance(ff, int | float) or not 0.0 <= ff < 1.0:
            raise SpecError(f"field_fraction must be a number in [0, 1), got {ff!r}")
        base = check_base(data.get("base", "digits"))
        threshold = data.get("retrain_threshold")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int) or not threshold >= 1
        ):
            raise SpecError(f"retrain_threshold must be an integer >= 1, got {threshold!r}")
        schedule = data.get("schedule_s")
        if schedule is not None and (
            isinstance(schedule, bool)
            or not isinstance(schedule, int | float)
            or not math.isfinite(schedule)
            or schedule < 1
        ):
            raise SpecError(f"schedule_s must be a number of seconds >= 1, got {schedule!r}")
        cooldown = data.get("cooldown_s")
        if cooldown is not None and (
            isinstance(cooldown, bool)
            or not isinstance(cooldown, int | float)
            or not math.isfinite(cooldown)
            or cooldown < 0
        ):
            raise SpecError(f"cooldown_s must be a number of seconds >= 0, got {cooldown!r}")
        alerts = data.get("retrain_on_alerts") or []
        if (
            not isinstance(alerts, list | tuple)
            or len(alerts) > MAX_ALERT_RULES
            or not all(isinstance(a, str) and _RULE_NAME.fullmatch(a) for a in alerts)
            or len(set(alerts)) != len(alerts)
        ):
            raise SpecError(
                f"retrain_on_alerts must be a list of at most {MAX_ALERT_RULES} distinct alert "
                f"rule names, got {str(alerts)[:200]}"
            )
        return cls(
            trainer=trainer,
            hyperparams=dict(hyperparams),
            seed=seed,
            warm_start=warm,
            field_fraction=float(ff),
            base=base,
            gate=GateConfig.from_dict(data.get("gate") or {}),
            retrain_threshold=threshold,
            schedule_s=float(schedule) if schedule is not None else None,
            cooldown_s=float(cooldown) if cooldown is not None else None,
            retrain_on_alerts=tuple(alerts),
            capture=(
                CaptureConfig.from_dict(data["capture"])
                if data.get("capture") is not None
                else None
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gate"] = self.gate.to_dict()
        out["retrain_on_alerts"] = list(self.retrain_on_alerts)
        if self.capture is None:
            del out["capture"]  # stored configs written before it stay byte-identical
        else:
            out["capture"] = self.capture.to_dict()
        return out


def check_base(value: Any) -> str:
    """``digits`` or ``imagefolder:<absolute or relative path>``. Raises SpecError."""
    if value == "digits":
        return value
    if isinstance(value, str) and value.startswith(IMAGEFOLDER_PREFIX):
        path = value.removeprefix(IMAGEFOLDER_PREFIX)
        if path and "\x00" not in path and len(path) <= 4096:
            return value
    raise SpecError(f"base must be 'digits' or 'imagefolder:<path>', got {value!r}")


def parse_config(raw: bytes | str, *, fmt: str) -> LineConfig:
    """Parse config text in ``fmt`` ("json" or "toml"). Raises SpecError."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_CONFIG_BYTES:
            raise SpecError(f"training config is {len(raw)} bytes, limit {MAX_CONFIG_BYTES}")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"training config is not UTF-8: {exc}") from exc
    try:
        data = tomllib.loads(raw) if fmt == "toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"training config is not valid {fmt.upper()}: {exc}") from exc
    return LineConfig.from_dict(data)


def load_config(path: str | Path) -> LineConfig:
    """Read a ``.toml`` or ``.json`` training config file.

    Raises:
        SpecError: the file is unreadable, too large, of another kind, or invalid.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SpecError(f"training config {str(p)!r} must end in .toml or .json")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise SpecError(f"training config {str(p)!r} is {size} bytes, limit {MAX_CONFIG_BYTES}")
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read training config {str(p)!r}: {exc.strerror or exc}") from exc
    return parse_config(raw, fmt=suffix[1:])


__all__ = ["GateConfig", "LineConfig", "check_base", "load_config", "parse_config"]
