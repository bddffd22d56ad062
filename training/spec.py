"""The job spec: what the server asks one training run to do, read from ``spec.json``.

The document is the fixed interface between the server and ``python -m training``; every field is
checked here so a bad request fails in milliseconds with a message naming the field, before any
data is loaded or any model trained. Unknown keys are refused too: a misspelt ``hyperparams``
must not silently train with defaults.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract import ContractError, InputSpec
from training.config import DEFAULT_FIELD_FRACTION, GateConfig, check_base
from training.errors import SpecError
from training.trainers import get_trainer

_MODEL_LINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # same rule as the manifest
MAX_SPEC_BYTES = 1024 * 1024  # bytes; a spec is a few hundred bytes
MAX_SEED = 2**32 - 1  # numpy / scikit-learn accept seeds in [0, 2**32)

_KEYS = {
    "job_id",
    "model_line",
    "trainer",
    "hyperparams",
    "seed",
    "samples_path",
    "champion",
    "gate",
    "input_spec",
    "labels",
    "output_dir",
    "base",
    "field_fraction",
    "warm_start",
}
_OPTIONAL = {"hyperparams", "samples_path", "champion", "base", "field_fraction", "warm_start"}


@dataclass(frozen=True)
class ChampionSpec:
    """The model currently serving the line; the challenger must beat it."""

    version: int
    onnx_path: Path
    weights_path: Path | None = None  # framework weights (weights.npz), for warm starts


# The gate bounds of a job are the line config's (see training.config.GateConfig).
GateSpec = GateConfig


@dataclass(frozen=True)
class JobSpec:
    """One training job, validated."""

    job_id: int
    model_line: str
    trainer: str
    seed: int
    input_spec: InputSpec
    labels: tuple[str, ...]
    output_dir: Path
    hyperparams: dict[str, Any] = field(default_factory=dict)  # as given (overrides only)
    samples_path: Path | None = None
    champion: ChampionSpec | None = None
    gate: GateSpec = GateSpec()
    base: str = "digits"  # "digits" or "imagefolder:<path>"
    field_fraction: float = DEFAULT_FIELD_FRACTION
    warm_start: bool = False  # start from champion.weights_path when it fits the trainer

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """Validate a parsed spec document.

        Raises:
            SpecError: naming the first offending field.
        """
        if not isinstance(data, Mapping):
            raise SpecError("spec must be a JSON object")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise SpecError(f"unknown spec key(s) {unknown}; expected {sorted(_KEYS)}")
        missing = sorted(k for k in _KEYS - _OPTIONAL if k not in data)
        if missing:
            raise SpecError(f"spec is missing required key(s) {missing}")

        job_id = _int(data["job_id"], "job_id", minimum=0)
        line = data["model_line"]
        if not isinstance(line, str) or not _MODEL_LINE.match(line):
            raise SpecError(f"model_line must match {_MODEL_LINE.pattern}, got {line!r}")
        trainer = data["trainer"]
        if not isinstance(trainer, str):
            raise SpecError(f"trainer must be a string, got {trainer!r}")
        hyperparams = data.get("hyperparams") or {}
        if not isinstance(hyperparams, Mapping):
            raise SpecError(f"hyperparams must be an object, got {hyperparams!r}")
        get_trainer(trainer).resolve(hyperparams)  # unknown trainer / hyperparameter -> SpecError
        seed = _int(data["seed"], "seed", minimum=0, maximum=MAX_SEED)

        try:
            input_spec = InputSpec.from_dict(data["input_spec"])
        except ContractError as exc:
            raise SpecError(f"invalid input_spec: {exc}") from exc
        labels = data["labels"]
        if (
            not isinstance(labels, list)
            or len(labels) < 2
            or not all(isinstance(x, str) and x for x in labels)
            or len(set(labels)) != len(labels)
        ):
            raise SpecError(f"labels must be a list of >= 2 distinct non-empty strings: {labels!r}")

        return cls(
            job_id=job_id,
            model_line=line,
            trainer=trainer,
            seed=seed,
            input_spec=input_spec,
            labels=tuple(labels),
            output_dir=_path(data["output_dir"], "output_dir"),
            hyperparams=dict(hyperparams),
            samples_path=_samples_path(data.get("samples_path")),
            champion=_champion(data.get("champion")),
            gate=_gate(data["gate"]),
            base=check_base(data.get("base", "digits")),
            field_fraction=_fraction(data.get("field_fraction", DEFAULT_FIELD_FRACTION)),
            warm_start=_bool(data.get("warm_start", False), "warm_start"),
        )


def _int(value: Any, name: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise SpecError(f"{name} must be >= {minimum}{upper}, got {value}")
    return value


def _path(value: Any, name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{name} must be a non-empty path string, got {value!r}")
    return Path(value)


def _samples_path(value: Any) -> Path | None:
    if value is None:
        return None
    path = _path(value, "samples_path")
    if not path.is_file():
        raise SpecError(f"samples_path {str(path)!r} is not a file")
    return path


def _champion(value: Any) -> ChampionSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise SpecError(f"champion must be an object or null, got {value!r}")
    extra = sorted(set(value) - {"version", "onnx_path", "weights_path"})
    if extra:
        raise SpecError(f"unknown champion key(s) {extra}")
    if "version" not in value or "onnx_path" not in value:
        raise SpecError("champion needs both 'version' and 'onnx_path'")
    version = _int(value["version"], "champion.version", minimum=1)
    path = _path(value["onnx_path"], "champion.onnx_path")
    if not path.is_file():
        raise SpecError(f"champion.onnx_path {str(path)!r} is not a file")
    weights: Path | None = None
    if value.get("weights_path") is not None:
        weights = _path(value["weights_path"], "champion.weights_path")
        if not weights.is_file():
            raise SpecError(f"champion.weights_path {str(weights)!r} is not a file")
    return ChampionSpec(version=version, onnx_path=path, weights_path=weights)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise SpecError(f"field_fraction must be a number in [0, 1), got {value!r}")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{name} must be true or false, got {value!r}")
    return value


def _gate(value: Any) -> GateSpec:
    if not isinstance(value, Mapping):
        raise SpecError(f"gate must be an object, got {value!r}")
    for key in ("max_golden_drop", "min_field_gain"):  # the server always states these two
        if key not in value:
            raise SpecError(f"gate.{key} is required")
    return GateConfig.from_dict(value)


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate ``spec.json``.

    Raises:
        SpecError: the file is unreadable, too large, not JSON, or any field is invalid.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"spec {str(p)!r} is {size} bytes, limit {MAX_SPEC_BYTES}")
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read spec {str(p)!r}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"spec {str(p)!r} is not valid JSON: {exc}") from exc
    return JobSpec.from_dict(data)


__all__ = ["ChampionSpec", "GateSpec", "JobSpec", "load_spec"]
