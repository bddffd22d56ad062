"""Request and response bodies (pydantic). Field names of device messages come from ``contract``.

``XCreate`` is what a client sends, ``XPublic`` what the server returns.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
    field_validator,
)

from contract import ContractError, InputSpec
from server.identity.auth import Role
from server.identity.enrollment import MAX_ENROLLMENT_USES
from server.monitoring.estimate import estimate_trusted

MAX_INT32 = 2**31 - 1
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Text = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]
OptText = Annotated[str, StringConstraints(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")]
Reason = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00]*$")]
Id32 = Annotated[int, Field(ge=1, le=MAX_INT32)]
Trainer = Literal["sklearn-mlp", "sklearn-logreg", "torch-cnn", "torch-mobilenet"]
ConfigPath = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
]
Alias = Literal["champion", "candidate", "latest"]


def _check_json(value: Any, depth: int = 0) -> None:
    """Hyperparameters must be plain, finite JSON a database can store."""
    if depth > 8:
        raise ValueError("nested too deeply (max 8 levels)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("strings must not contain NUL")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        raise ValueError("integers must fit in a double")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, depth + 1)
            _check_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- devices


class DeviceRegister(Strict):
    device_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    model_line: Name
    hardware: OptText | None = None
    groups: Annotated[list[Name], Field(max_length=32)] = []
    agent_version: OptText | None = None


class DevicePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    device_id: str
    model_line: str
    hardware: str | None
    groups: list[str]
    agent_version: str | None
    registered_at: datetime
    last_seen: datetime | None
    state: str | None
    model_version: int | None
    release: int | None
    last_reason: str | None


class DeviceEventPublic(BaseModel):
    """One stored status report; ``dropped`` lists what the server left out of it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    ts: float  # device clock (the server's receive time when the device's was dropped)
    state: str
    model_version: int | None
    release: int | None
    rollout_id: int | None
    target_release: int | None
    reason: str | None
    received_at: datetime
    dropped: list[str] | None


class RefusedReportPublic(BaseModel):
    """A report the server could not use, kept with the reason and a bounded excerpt."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    reason: str
    excerpt: str
    size: int | None  # bytes received; None when it came over HTTP already parsed
    received_at: datetime


# ---------------------------------------------------------------- samples


class SamplesUpload(Strict):
    # Items are checked one by one (each gets its own reason), so they stay plain JSON here.
    samples: Annotated[list[Any], Field(min_length=1)]


class RejectedSample(BaseModel):
    sample_id: str | None
    reason: str


class SamplesResult(BaseModel):
    accepted: int
    duplicates: int
    rejected: list[RejectedSample]
    # Stored but held back from dataset versions by screening (server.intake.screening); in
    # accepted.
    quarantined: list[RejectedSample] = []


# ---------------------------------------------------------------- model lines and versions


class ModelLineCreate(Strict):
    """A new line. The training config comes from ``config`` (inline, the format of
    ``training.config``), ``config_path`` (a file in the server's line-config directory), or the
    older ``trainer`` + ``hyperparams`` fields."""

    name: Name
    trainer: Trainer | None = None
    hyperparams: dict[str, Any] = {}
    config: dict[str, Any] | None = None
    config_path: ConfigPath | None = None
    input_spec: dict[str, Any]
    labels: Annotated[list[Text], Field(min_length=2, max_length=10_000)]
    retrain_threshold: Annotated[int, Field(ge=1, le=10**9)] | None = None
    initial_training: bool = True

    @field_validator("hyperparams", "config")
    @classmethod
    def _finite(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        _check_json(v)
        return v

    @field_validator("input_spec")
    @classmethod
    def _spec(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            spec = InputSpec.from_dict(v)
        except ContractError as exc:
            raise ValueError(str(exc)) from exc
        if not (math.isfinite(spec.min) and math.isfinite(spec.max)):
            raise ValueError("input_spec.min/max must be finite")
        if spec.features > 1 << 20 or len(spec.name) > 64:
            raise ValueError("input_spec is too large")
        return spec.to_dict()


class ModelLinePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    trainer: str
    hyperparams: dict[str, Any]
    input_spec: dict[str, Any]
    labels: list[str]
    retrain_threshold: int
    champion_version: int | None
    current_release: int | None
    last_release: int
    new_samples: int
    created_at: datetime
    training_config: dict[str, Any]
    schedule_s: float | None
    last_job_at: datetime | None


class LineConfigUpdate(Strict):
    """Replace a line's training config (applies to the next training)."""

    config: dict[str, Any] | None = None
    config_path: ConfigPath | None = None

    @field_validator("config")
    @classmethod
    def _finite(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        _check_json(v)
        return v


class ModelVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    line: str
    version: int
    status: str
    sha256: str | None
    size: int | None
    parent_version: int | None
    dataset_version: str | None
    trainer: str
    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    sample_count: int
    job_id: int | None
    reason: str | None
    created_at: datetime
    weights_sha256: str | None
    alert_id: int | None  # the alert whose training made it


class ModelVersionDetail(ModelVersionPublic):
    report: dict[str, Any]


class AliasPublic(ModelVersionDetail):
    alias: str


class ArtifactInfo(BaseModel):
    """Where a version's files are: the ONNX model (what devices run) and framework weights."""

    line: str
    version: int
    model_sha256: str | None
    model_size: int | None
    model_url: str | None
    weights_sha256: str | None
    weights_url: str | None
    opset: int | None
    dataset_version: str | None


class ReleasePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    line: str
    release: int
    model_version: int
    sha256: str
    envelope: dict[str, Any]
    created_at: datetime


# ---------------------------------------------------------------- training jobs


class TrainingJobCreate(Strict):
    model_line: Name


class TrainingJobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model_line: str
    status: str
    trigger: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    result_version: int | None
    sample_count: int | None
    attempts: int
    max_attempts: int
    claimed_by: str | None
    heartbeat_at: datetime | None
    not_before: datetime | None
    dataset_version: str | None
    alert_id: int | None  # trigger "alert": the alert that queued it
    trained_at: datetime | None = None  # when a worker handed the result back
    result_sha256: str | None = None  # the handed-back model.onnx (artifact store)
    register_attempts: int = 0  # registrations that failed for a reason of the server's


# ---------------------------------------------------------------- monitoring


Group = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")]
AlertRuleName = Literal["drift", "estimated_accuracy", "live_accuracy", "latency", "error_rate"]
AlertStateName = Literal["raised", "cleared"]


class AlertPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    rule: str
    model_line: str
    model_version: int
    group: str = Field(validation_alias=AliasChoices("group_name", "group"))
    state: str
    first_window: datetime
    last_window: datetime
    cleared_window: datetime | None
    raised_at: datetime
    cleared_at: datetime | None
    value: float | None
    samples: int
    retrain_job_id: int | None
    retrain_note: str | None
    # Who acknowledged it, when, and their note (None: not acknowledged).
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    ack_note: str | None = None


class AlertAcknowledge(BaseModel):
    """An operator acknowledges a raised alert (who: the bearer token's operator)."""

    note: Reason | None = None  # at most 1000 characters


class WebhookDeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    event: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class AlertDetail(AlertPublic):
    figures: dict[str, Any]
    deliveries: list[WebhookDeliveryPublic]


class MonitorWindowPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model_line: str
    model_version: int
    group: str = Field(validation_alias=AliasChoices("group_name", "group"))
    window_start: datetime
    window_end: datetime
    devices: int
    summaries: int
    samples: int
    drift_breach: bool | None
    drift_ratio: float | None
    drifted: list[str] | None
    estimated_accuracy: float | None
    estimated_low: float | None
    estimated_high: float | None
    reference_accuracy: float | None
    labelled: int
    live_accuracy: float | None
    live_low: float | None
    live_high: float | None
    inferences: int
    errors: int
    latency_p95_ms: float | None
    breaches: list[str]
    note: str | None
    drift: dict[str, Any] | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def estimate_trusted(self) -> bool | None:
        """False when the drift verdict breaches: the label-free estimate may be far off."""
        return estimate_trusted(self.estimated_accuracy, self.drift)


# ---------------------------------------------------------------- rollouts


Percent = Annotated[float, Field(ge=0, le=100)]
Seconds = Annotated[float, Field(ge=0, le=30 * 86400)]


class WaveSelector(Strict):
    groups: Annotated[list[Name], Field(min_length=1, max_length=20)]


class WaveAbort(Strict):
    failure_pct: Percent | None = None
    min_devices: Annotated[int, Field(ge=1, le=MAX_INT32)] | None = None


class WaveCreate(Strict):
    """One wave of a plan (server.rollout.plan.Wave); unset fields take the settings'."""

    name: OptText | None = None
    percent: Annotated[float, Field(gt=0, le=100)] | None = None  # cumulative
    selector: WaveSelector | None = None
    success_pct: Percent | None = None
    error_pct: Percent | None = None
    abort: WaveAbort | None = None
    min_soak_s: Seconds | None = None
    timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] | None = None
    manual_gate: bool = False
    # "shadow" (first wave only): its devices run the new model beside the champion, serving
    # the champion's answers; the serve waves follow only if the shadow gate holds.
    kind: Literal["serve", "shadow"] = "serve"


DeviceId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]
RuntimeVersion = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,6}(\.[0-9]{1,6}){0,3}$")]
MAX_TARGET_DEVICES = 10_000  # = contract.manifest.MAX_TARGET_ENTRIES
MAX_TARGET_NAMES = 256  # groups / hardware classes one rollout may name


class TargetingCreate(Strict):
    """Who a rollout is for (contract.Targeting, signed into its releases); empty = any.

    Every non-empty criterion must match: a device outside it is not a member of the rollout
    and refuses the release anyway. The opset is not set here: it is the model's, read from
    the version's training report at signing.
    """

    groups: Annotated[list[Name], Field(max_length=MAX_TARGET_NAMES)] = []
    hardware_classes: Annotated[list[Text], Field(max_length=MAX_TARGET_NAMES)] = []
    device_ids: Annotated[list[DeviceId], Field(max_length=MAX_TARGET_DEVICES)] = []
    min_runtime_version: RuntimeVersion | None = None  # lowest ONNX Runtime, e.g. "1.17"


class RolloutCreate(Strict):
    model_line: Name
    model_version: Id32
    canary_percent: Annotated[int, Field(ge=1, le=100)] | None = None  # = waves [p, 100]
    waves: Annotated[list[WaveCreate], Field(min_length=1, max_length=20)] | None = None
    targeting: TargetingCreate | None = None
    # The authenticated operator is recorded; a name given here must be that operator's (403).
    created_by: Text | None = None


class RolloutApprove(Strict):
    approver: Text | None = None  # must be the authenticated operator's name when given


class RolloutAction(Strict):
    by: Text | None = None  # must be the authenticated operator's name when given
    reason: Reason | None = None


class RolloutPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model_line: str
    from_version: int | None
    to_version: int
    release: int | None
    rollback_release: int | None
    state: str
    paused_state: str | None
    stage: int
    canary_percent: int
    created_by: str
    approved_by: str | None
    created_at: datetime
    approved_at: datetime | None
    full_at: datetime | None
    paused_at: datetime | None
    finished_at: datetime | None
    reason: str | None
    gates: dict[str, Any] | None
    plan: dict[str, Any] | None = None  # waves and frozen cut-offs (server.rollout.plan)
    targeting: dict[str, Any] | None = None  # contract.Targeting.to_dict() minus opset; None: any


class RolloutDetail(RolloutPublic):
    # stage ("canary" = wave 1, "rest" = later waves) -> device state -> count
    devices: dict[str, dict[str, int]]
    # per wave: index, label, spec, state (pending/running/done), counts, started/finished
    waves: list[dict[str, Any]] = []


# ---------------------------------------------------------------- identity (routes/auth.py)

Secret = Annotated[str, StringConstraints(min_length=1, max_length=512)]
# Long enough that it cannot be guessed (a device makes it with secrets.token_urlsafe(32)).
EnrollSecret = Annotated[str, StringConstraints(min_length=32, max_length=512)]
MAX_TOKEN_TTL_S = 366 * 86400.0  # seconds a bootstrap token may live at most


class OperatorMe(BaseModel):
    name: str
    role: Role


class OperatorTokenCreate(Strict):
    name: Text
    role: Role


class OperatorTokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


class OperatorTokenIssued(OperatorTokenPublic):
    token: str  # plaintext, shown once


class EnrollmentTokenCreate(Strict):
    max_uses: Annotated[int, Field(ge=1, le=MAX_ENROLLMENT_USES)] = 1
    ttl_s: Annotated[float, Field(gt=0, le=MAX_TOKEN_TTL_S)] | None = None  # seconds
    model_line: Name | None = None  # pin the line enrolled devices may join
    groups: Annotated[list[Name], Field(max_length=32)] = []  # groups they may claim


class EnrollmentTokenIssued(BaseModel):
    id: int
    token: str  # plaintext, shown once
    max_uses: int
    expires_at: datetime
    model_line: str | None
    groups: list[str]


class DeviceEnroll(Strict):
    bootstrap_token: Secret
    device_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    model_line: Name
    hardware: OptText | None = None
    groups: Annotated[list[Name], Field(max_length=32)] = []
    agent_version: OptText | None = None
    # A random secret the device makes once per enrollment and keeps until it has stored its
    # credential: a retry with the same one after a lost reply gets a new credential (the
    # first is withdrawn) instead of 409. None: a retry is refused as before.
    enroll_secret: EnrollSecret | None = None


class DeviceEnrolled(BaseModel):
    device_id: str
    credential: str  # plaintext, shown once: HTTP bearer token and MQTT password
    device: DevicePublic
