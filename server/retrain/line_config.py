"""Resolve a model line's training config from an API request or a settings file.

The format and its checks live in :mod:`training.config` (one definition for the server and the
trainer); this module only decides *where* the document comes from: an inline object, a file
named relative to ``settings.line_configs_dir`` (never outside it), or the legacy ``trainer`` and
``hyperparams`` fields with the server's default gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.core.config import Settings
from server.core.errors import ConfigError, InvalidRequestError
from server.monitoring.rules import Rule
from training.config import LineConfig, load_config
from training.errors import SpecError


def _gate_defaults(settings: Settings) -> dict[str, float]:
    return {
        "max_golden_drop": settings.train_max_golden_drop,
        "min_field_gain": settings.train_min_field_gain,
    }


def config_file(settings: Settings, name: str) -> Path:
    """``name`` inside the line-config directory. Raises InvalidRequestError if it escapes."""
    root = settings.line_configs_dir.resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root) or path == root:
        raise InvalidRequestError(
            f"config_path must name a file inside the line-config directory {str(root)!r}"
        )
    return path


def check_alert_rules(config: LineConfig) -> LineConfig:
    """``config`` if every rule in its ``retrain_on_alerts`` and ``capture.on_alerts`` is an
    alert rule of this server.

    Raises:
        SpecError: naming the unknown rule and the known ones.
    """
    known = [r.value for r in Rule]
    unknown = [name for name in config.retrain_on_alerts if name not in known]
    if unknown:
        raise SpecError(f"retrain_on_alerts: unknown alert rule(s) {unknown}; known: {known}")
    capture = config.capture.on_alerts if config.capture is not None else ()
    unknown = [name for name in capture if name not in known]
    if unknown:
        raise SpecError(f"capture.on_alerts: unknown alert rule(s) {unknown}; known: {known}")
    return config


def resolve_line_config(
    settings: Settings,
    *,
    trainer: str | None = None,
    hyperparams: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
) -> LineConfig:
    """The line's config from exactly one source.

    Raises:
        InvalidRequestError: more than one source, an unreadable file, or an invalid config.
    """
    given = [config is not None, config_path is not None]
    if sum(given) > 1:
        raise InvalidRequestError("give either config or config_path, not both")
    if any(given) and (trainer is not None or hyperparams):
        raise InvalidRequestError(
            "trainer and hyperparams belong inside the training config when one is given"
        )
    try:
        if config_path is not None:
            return check_alert_rules(load_config(config_file(settings, config_path)))
        if config is not None:
            return check_alert_rules(LineConfig.from_dict(config))
        return LineConfig.from_dict(
            {
                "trainer": trainer or "sklearn-mlp",
                "hyperparams": hyperparams or {},
                "gate": _gate_defaults(settings),
            }
        )
    except SpecError as exc:
        raise InvalidRequestError(f"invalid training config: {exc}") from exc


def bootstrap_line_config(settings: Settings) -> LineConfig:
    """The bootstrap line's config: ``bootstrap_config`` if set, else ``bootstrap_trainer``.

    Raises:
        ConfigError: the file is unreadable or invalid (the server refuses to start).
    """
    try:
        if settings.bootstrap_config is not None:
            return check_alert_rules(load_config(settings.bootstrap_config))
        return LineConfig.from_dict(
            {"trainer": settings.bootstrap_trainer, "gate": _gate_defaults(settings)}
        )
    except SpecError as exc:
        raise ConfigError(f"bootstrap training config: {exc}") from exc


__all__ = ["bootstrap_line_config", "check_alert_rules", "config_file", "resolve_line_config"]
