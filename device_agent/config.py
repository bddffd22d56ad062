"""Agent configuration: one dataclass holding every limit, each with its unit.

``load_config`` reads a JSON file whose keys are the field names of ``AgentConfig``, except that
the pinned root is given as ``trusted_root_file`` (the root v1 envelope JSON, relative to the
config file) and legacy pinned release keys as ``trusted_key_files`` (PEM paths). Any field can be
overridden by an environment variable ``EDGELOOP_AGENT_<FIELD>`` (upper case); for
``trusted_key_files`` the variable holds paths separated by ``os.pathsep``, for ``groups`` names
separated by commas.

Types are checked like the server's pydantic settings, without pydantic (which would cost a
device ~10 MB of resident memory): every field is checked against its annotation when an
``AgentConfig`` is built, and ``load_config`` reports every unknown key, missing key and
mistyped value of a file at once, each with the field, the value and the type expected, e.g.
``mqtt_port: "oops" is a string, expected an integer``. JSON integers are accepted where a float
is expected, strings where a path is; nothing else is converted (``"no"`` is not a boolean).

Trust: with ``trusted_root`` set (the normal case) the device pins only the offline root and
learns newer roots from the server, so online keys rotate without touching it. ``trusted_keys``
is the legacy mode (pinned release keys, no rotation or revocation); it is used only when no root
is pinned.
"""

from __future__ import annotations

import json
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

from contract import RootError, SignatureError
from contract.ed25519 import VerifyKey
from contract.mqtt_tls import MqttTls, MqttTlsError, tls_problems
from contract.topics import valid_device_id
from contract.trust import load_pinned_root
from device_agent.errors import ConfigError
from device_agent.probation import ProbationPolicy

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"
ENV_PREFIX = "EDGELOOP_AGENT_"
MiB = 1024 * 1024
# Keys earlier versions read, now ignored with a warning (a device's config outlives upgrades).
REMOVED_KEYS = {
    "ort_binding": "the agent serves through the onnxruntime package only",
    "build_nice": "sessions are built on the updater's thread",
}


@dataclass
class AgentConfig:
    """Everything one agent needs. No global state: 20+ agents may share a process."""

    device_id: str
    model_line: str
    server_url: str = "http://127.0.0.1:8000"
    # "production" refuses what development tolerates: an HTTP redirect to a plain-http URL.
    environment: Literal["development", "production"] = "development"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_keepalive_s: int = 30  # seconds between MQTT pings
    # Seconds the broker keeps our session while we are offline; 0 (the default): no session
    # is kept. The target is retained and reports wait in our own outbox, so nothing needs the
    # broker to remember us, and an offline device costs the broker nothing (see mqtt.py).
    mqtt_session_expiry_s: int = 0
    mqtt_reconnect_min_s: float = 1.0  # seconds, first MQTT reconnect delay
    mqtt_reconnect_max_s: float = 60.0  # seconds, cap on the MQTT reconnect delay
    # MQTT over TLS (contract.mqtt_tls says what each does). Production refuses plain MQTT
    # unless mqtt_allow_plaintext is set, and refuses mqtt_tls_insecure.
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None  # PEM CAs trusted for the broker (None: the system's)
    mqtt_client_cert: Path | None = None  # PEM client certificate, when the broker wants one
    mqtt_client_key: Path | None = None  # its PEM key (None: inside mqtt_client_cert)
    mqtt_tls_insecure: bool = False  # skip the broker host name check (development only)
    mqtt_allow_plaintext: bool = False  # production: allow plain MQTT anyway
    state_dir: Path = Path(".edgeloop/agent")
    trusted_root: bytes | None = None  # pinned root v1 envelope (JSON); see contract.trust
    trusted_keys: list[bytes] = field(default_factory=list)  # LEGACY pinned release keys (PEM)
    signature_threshold: int = 1  # legacy mode only: distinct trusted signatures a manifest needs
    clock_skew_s: float = 300.0  # seconds of clock error tolerated on every expires_at
    # Targeting facts this device matches a release's signed targeting against.
    groups: list[str] = field(default_factory=list)
    # One-time enrollment secret; exchanged for a credential kept in state_dir/credential.json.
    bootstrap_token: str = field(default="", repr=False)
    max_opset: int = 21  # highest ONNX default-domain opset this device's runtime runs
    # Hardware class: registered with the server (rollout audiences) and matched against a
    # release's signed targeting.hardware_classes.
    hardware: str = "generic"
    agent_version: str = AGENT_VERSION
    intra_op_num_threads: int = 1  # ONNX Runtime threads per inference session
    # ONNX Runtime graph optimisation: "disable", "basic", "extended" or "all". "basic" builds
    # a session in half the time of "all" (less GIL held while a swap loads) with the same
    # latency on MLPs; "all" adds layout rewrites that can speed up large convolutional models.
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "basic"
    # Capture of samples worth retraining on.
    confidence_floor: float = 0.6  # probability: capture if the top-class confidence is below
    capture_wrong: bool = True  # capture when ground truth disagrees with the prediction
    pending_labels_max: int = 10_000  # predictions awaiting ground truth; the oldest is dropped
    upload_batch_max: int = 200  # samples per upload batch (one spool file)
    upload_interval_s: float = 1.0  # seconds between upload attempts
    upload_backoff_cap_s: float = 60.0  # seconds, cap on the upload retry delay
    spool_max_bytes: int = 64 * MiB  # bytes of spooled batches; the oldest batch is dropped
    metrics_interval_s: float = 5.0  # seconds per metrics window
    # Seconds per monitoring period: one histogram summary per model that served (never an
    # input; well under 2 KB); 0 turns monitoring off. See device_agent.monitor.
    monitor_interval_s: float = 60.0
    latency_samples_max: int = 10_000  # latencies kept per window and model version
    # Network.
    # Proxies come from the environment, as for curl: HTTPS_PROXY / HTTP_PROXY / NO_PROXY.
    http_timeout_s: float = 10.0  # seconds, connect/read timeout of every HTTP request
    ca_bundle: Path | None = None  # PEM file of the CAs trusted for HTTPS (None: the system's)
    max_redirects: int = 5  # redirects one GET follows (artifact mirrors, CDNs, signed URLs)
    download_chunk_bytes: int = 64 * 1024  # bytes read per chunk while streaming an artifact
    max_artifact_bytes: int = 256 * MiB  # bytes, hard cap enforced while streaming
    download_retries: int = 4  # extra attempts after a failed download
    backoff_base_s: float = 0.5  # seconds, first retry delay (doubles per attempt)
    backoff_cap_s: float = 30.0  # seconds, cap on one retry delay (before jitter)
    connect_retry_s: float = 5.0  # seconds between register / target-poll attempts
    update_retry_s: float = 30.0  # seconds before a FAILED (transient) target is retried
    min_download_bps: int = 1024  # bytes/s: slower than this over the window is a slow retrieval
    slow_retrieval_window_s: float = 30.0  # seconds over which the download rate is measured
    target_poll_interval_s: float = 60.0  # seconds between HTTP target polls while MQTT is down
    # Hot swap.
    min_free_memory_bytes: int = 32 * MiB  # bytes that must stay free after loading a model
    load_headroom_factor: float = 4.0  # x artifact size a new session may need while loading
    release_wait_s: float = 5.0  # seconds to wait for in-flight inferences on a retired session
    switch_interval_s: float = 0.0005  # seconds; interpreter thread switch interval (0: keep)
    freeze_heap: bool = True  # gc.freeze() once serving: collections skip start-up's objects
    # Probation: metric-gated commit after a swap (see probation.py).
    probation_min_labelled: int = 30  # labelled inferences that, if they hold, commit at once
    probation_max_s: float = 60.0  # seconds: commit on this bound if nothing degraded
    probation_min_labelled_to_judge: int = 10  # labels before accuracy is compared
    probation_max_accuracy_drop: float = 0.05  # absolute accuracy drop tolerated
    probation_accuracy_z: float = 2.0  # one-sided z-score the drop must also reach
    probation_max_error_rate_increase: float = 0.02  # absolute error-rate increase tolerated
    probation_max_latency_ratio: float = 2.0  # p95 bound: previous p95 * ratio + slack
    probation_latency_slack_ms: float = 5.0  # ms
    probation_max_boots: int = 3  # agent restarts during one probation before rolling back
    # Offline operation.
    spool_fsync: bool = True  # fsync each captured sample before feedback() returns
    outbox_max_records: int = 10_000  # status/metrics reports held while the broker is away

    def __post_init__(self) -> None:
        problems = conform_fields(self)
        if problems:
            raise ConfigError("invalid agent config: " + "; ".join(problems))
        if not valid_device_id(self.device_id):
            raise ConfigError(f"device_id {self.device_id!r} is not a valid topic level")
        if not self.model_line:
            raise ConfigError("model_line is required")
        if not 0.0 <= self.confidence_floor <= 1.0:
            raise ConfigError("confidence_floor must be within 0..1")
        for name in (
            "pending_labels_max",
            "upload_batch_max",
            "spool_max_bytes",
            "download_chunk_bytes",
            "max_artifact_bytes",
            "intra_op_num_threads",
            "signature_threshold",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.max_redirects < 0:
            raise ConfigError("max_redirects must be >= 0")
        if not (self.monitor_interval_s >= 0 and self.monitor_interval_s < float("inf")):
            raise ConfigError("monitor_interval_s must be >= 0 seconds (0: monitoring off)")
        if self.probation_max_s < 0 or self.probation_min_labelled < 1:
            raise ConfigError("probation_max_s must be >= 0 and probation_min_labelled >= 1")
        problems = tls_problems(
            environment=self.environment,
            tls=self.mqtt_tls,
            ca_file=self.mqtt_ca_file,
            cert_file=self.mqtt_client_cert,
            key_file=self.mqtt_client_key,
            insecure=self.mqtt_tls_insecure,
            allow_plaintext=self.mqtt_allow_plaintext,
        )
        if problems:
            raise ConfigError("invalid agent config: " + "; ".join(problems))
        self.server_url = self.server_url.rstrip("/")

    def mqtt_tls_settings(self) -> MqttTls | None:
        """The broker link's TLS settings; None: plain MQTT."""
        if not self.mqtt_tls:
            return None
        return MqttTls(
            ca_file=self.mqtt_ca_file,
            cert_file=self.mqtt_client_cert,
            key_file=self.mqtt_client_key,
            check_hostname=not self.mqtt_tls_insecure,
        )

    def probation_policy(self) -> ProbationPolicy:
        return ProbationPolicy(
            min_labelled=self.probation_min_labelled,
            max_s=self.probation_max_s,
            min_labelled_to_judge=self.probation_min_labelled_to_judge,
            max_accuracy_drop=self.probation_max_accuracy_drop,
            accuracy_z=self.probation_accuracy_z,
            max_error_rate_increase=self.probation_max_error_rate_increase,
            max_latency_ratio=self.probation_max_latency_ratio,
            latency_slack_ms=self.probation_latency_slack_ms,
        )


# ---- type checking ---------------------------------------------------------------------------
class _Mistyped(Exception):
    """A value that does not fit a type (internal to ``conform``)."""


@cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(AgentConfig)


def conform(hint: Any, value: Any) -> Any:
    """``value`` if it has the type ``hint`` names, converted where JSON cannot say it (an int
    where a float is expected, a string where a path is); else raises ``_Mistyped``.

    Handles the annotations ``AgentConfig`` uses: bool, int, float, str, bytes, Path, Literal,
    ``X | None`` and ``list[X]``. A bool is never an int here, although Python says it is.
    """
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
    elif origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arm in typing.get_args(hint):
            if arm is not type(None):
                try:
                    return conform(arm, value)
                except _Mistyped:
                    pass
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(hint)
            return [conform(item, v) for v in value]
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is Path:
        if isinstance(value, str | os.PathLike):
            return Path(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mistyped


def describe_type(hint: Any) -> str:
    """How a config error names the type ``hint`` (in JSON terms)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(v) for v in typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        arms = [describe_type(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join([*arms, "null"])
    if origin is list:
        return f"a list of {describe_type(typing.get_args(hint)[0]).removeprefix('a ')}s"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "a path" if hint is Path else f"a {getattr(hint, '__name__', hint)}")


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value))
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} is {kind or type(value).__name__}"


def type_problems(values: Mapping[str, Any]) -> list[str]:
    """One line per value of ``values`` (field name -> value) that its field's type refuses."""
    hints = _field_types()
    problems = []
    for name, value in values.items():
        try:
            conform(hints[name], value)
        except _Mistyped:
            problems.append(
                f"{name}: {_describe_value(value)}, expected {describe_type(hints[name])}"
            )
    return problems


def conform_fields(config: AgentConfig) -> list[str]:
    """Convert every field of ``config`` to its declared type in place; return the problems."""
    hints = _field_types()
    problems = []
    for f in fields(config):
        value = getattr(config, f.name)
        try:
            setattr(config, f.name, conform(hints[f.name], value))
        except _Mistyped:
            problems.append(
                f"{f.name}: {_describe_value(value)}, expected {describe_type(hints[f.name])}"
            )
    return problems


def _coerce(name: str, kind: str, raw: str) -> Any:
    """Turn an environment string into the field's type (annotations are strings here)."""
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "Path":
            return Path(raw)
        if kind.startswith("list[str]"):
            return [p.strip() for p in raw.split(",") if p.strip()]
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw


def _read_keys(paths: list[Any], base: Path) -> list[bytes]:
    keys: list[bytes] = []
    for p in paths:
        path = Path(p) if Path(p).is_absolute() else base / p
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read trusted key {path}: {exc}") from exc
        try:
            VerifyKey.from_pem(pem)
        except SignatureError as exc:
            raise ConfigError(f"trusted key {path}: {exc}") from exc
        keys.append(pem)
    return keys


def _read_root(name: str, base: Path) -> bytes:
    path = Path(name) if Path(name).is_absolute() else base / name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trusted root {path}: {exc}") from exc
    try:
        load_pinned_root(raw)
    except RootError as exc:
        raise ConfigError(f"{path} is not valid root metadata: {exc}") from exc
    return raw


def config_from_mapping(
    data: Mapping[str, Any],
    *,
    base: Path,
    env: Mapping[str, str] | None = None,
    source: str = "",
) -> AgentConfig:
    """Build a config from parsed JSON plus environment overrides (``env`` defaults to os.environ).

    Raises:
        ConfigError: unknown or missing keys and mistyped values (all of them, in one
            message naming ``source``), a bad value, or an unreadable key file.
    """
    env = os.environ if env is None else env
    known = {f.name: f for f in fields(AgentConfig)}
    values: dict[str, Any] = {}
    key_files: list[Any] = []
    root_file: str | None = None
    problems: list[str] = []
    for key, value in data.items():
        if key == "trusted_key_files":
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                key_files = list(value)
            else:
                problems.append(
                    f"trusted_key_files: {_describe_value(value)}, expected a list of paths"
                )
        elif key == "trusted_keys":
            problems.append("trusted_keys: give trusted keys as trusted_key_files (PEM paths)")
        elif key == "trusted_root_file":
            if isinstance(value, str):
                root_file = value
            else:
                problems.append(f"trusted_root_file: {_describe_value(value)}, expected a path")
        elif key == "trusted_root":
            problems.append("trusted_root: give the pinned root as trusted_root_file (a path)")
        elif key in REMOVED_KEYS:
            log.warning("config key %r is no longer read (%s); ignored", key, REMOVED_KEYS[key])
        elif key in known:
            values[key] = value
        else:
            problems.append(_unknown(key, known))
    for name, f in known.items():
        raw = env.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is not None and name not in ("trusted_keys", "trusted_root"):
            values[name] = _coerce(name, str(f.type), raw)
    raw_keys = env.get(f"{ENV_PREFIX}TRUSTED_KEY_FILES")
    keys_base = root_base = base
    if raw_keys is not None:
        key_files, keys_base = [p for p in raw_keys.split(os.pathsep) if p], Path.cwd()
    raw_root = env.get(f"{ENV_PREFIX}TRUSTED_ROOT_FILE")
    if raw_root is not None:
        root_file, root_base = raw_root, Path.cwd()
    problems += type_problems(values)
    problems += [
        f"{f.name}: missing, expected {describe_type(_field_types()[f.name])}"
        for f in known.values()
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING
    ]
    if problems:
        where = f" {source}" if source else ""
        raise ConfigError(f"invalid agent config{where}: " + "; ".join(problems))
    values["trusted_keys"] = _read_keys(key_files, keys_base)
    if root_file:
        values["trusted_root"] = _read_root(root_file, root_base)
    # Relative paths are relative to the config file.
    for name in ("state_dir", "ca_bundle", "mqtt_ca_file", "mqtt_client_cert", "mqtt_client_key"):
        if values.get(name) is not None:
            p = Path(values[name])
            values[name] = p if p.is_absolute() else base / p
    if values.get("ca_bundle") is not None:
        _check_ca_bundle(values["ca_bundle"])
    config = AgentConfig(**values)
    check_mqtt_tls(config)
    return config


def check_mqtt_tls(config: AgentConfig) -> None:
    """Load the MQTT TLS files once, so a missing or bad one stops the agent at start.

    Raises:
        ConfigError: naming the setting and the file.
    """
    tls = config.mqtt_tls_settings()
    if tls is None:
        return
    try:
        tls.context()
    except MqttTlsError as exc:
        raise ConfigError(f"invalid agent config: {exc}") from exc


def _check_ca_bundle(path: Path) -> None:
    """Load ``path`` as a CA bundle once, so a bad one stops the agent at start."""
    import ssl

    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca_bundle {path}: not a readable PEM CA bundle: {exc}") from exc


def _unknown(key: str, known: Mapping[str, Any]) -> str:
    import difflib  # only on this error path

    close = difflib.get_close_matches(key, [*known, "trusted_key_files", "trusted_root_file"], 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown key{hint}"


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read an agent config JSON file, applying ``EDGELOOP_AGENT_<FIELD>`` overrides.

    Raises:
        ConfigError: the file is unreadable or invalid.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("config must be a JSON object")
    return config_from_mapping(data, base=p.resolve().parent, env=env, source=str(p))
