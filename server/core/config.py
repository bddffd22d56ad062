"""Server settings (pydantic-settings, environment prefix ``EDGELOOP_``).

Nothing here runs at import time: ``Settings()`` is built by the caller (``server.main.run`` or a
test) and handed to ``create_app``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The bootstrap admin token used in development when EDGELOOP_ADMIN_TOKEN is empty. Public by
# design (it is in the docs); production refuses to start without a real one.
DEV_ADMIN_TOKEN = "edgeloop-dev-admin-token"


class Settings(BaseSettings):
    """Every knob of the server, each with its unit."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    @model_validator(mode="after")
    def _default_public_url(self) -> Settings:
        if not self.public_url:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
            if ":" in host:  # an IPv6 address
                host = f"[{host}]"
            self.public_url = f"http://{host}:{self.port}"
        return self

    environment: Literal["development", "production"] = "development"
    database_url: str = "sqlite:///./var/edgeloop.db"
    data_dir: Path = Path("./var")
    # Base of the absolute artifact URLs sent to devices. Empty: http://<host>:<port> of this
    # server (127.0.0.1 when it listens on every interface), so a server started on another
    # port never sends devices to the default one. Set it when devices reach the server
    # through another name (a load balancer, a CDN, a public address).
    public_url: str = ""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # Artifact store (server.release.artifacts). Empty: the directory data_dir/artifacts, one
    # process's disk. file:///absolute/dir, or s3://bucket[/prefix]: an S3-compatible object
    # store that several server processes and training workers share (the `s3` extra).
    artifact_store_url: str = ""
    # S3 connection; each empty one falls back to the standard AWS environment (AWS_ENDPOINT_URL,
    # AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and instance
    # credentials. An http:// endpoint, named here or there, is allowed (a local MinIO).
    artifact_s3_endpoint_url: str = ""
    artifact_s3_region: str = ""
    artifact_s3_access_key_id: str = ""
    artifact_s3_secret_access_key: str = ""
    # Base of the artifact URLs given to devices: BASE/<sha256> (a CDN, or the bucket's public
    # HTTP endpoint, serving the store's objects with Range). Empty: this server's own route,
    # public_url/api/v1/artifacts. Devices check the signed sha256 and size, not the host.
    artifact_base_url: str = ""

    @field_validator("artifact_base_url")
    @classmethod
    def _http_base(cls, value: str) -> str:
        if value and not re.fullmatch(r"https?://[^\s?#]+", value):
            raise ValueError("must be an http(s):// URL without query or fragment")
        return value.rstrip("/")

    @property
    def artifact_url_base(self) -> str:
        """What devices prepend to ``/<sha256>`` to download an artifact."""
        return self.artifact_base_url or f"{self.public_url.rstrip('/')}/api/v1/artifacts"

    # MQTT: mqtt_enabled says the deployment uses a broker; enable_mqtt lets a test build an
    # app without the bridge thread.
    mqtt_enabled: bool = True
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    # Must be stable across restarts and unique per server process (the broker keeps the session
    # and queues device reports while the server is down). Empty: edgeloop-server-<host>-<port>.
    mqtt_client_id: str = ""
    mqtt_session_expiry_s: int = Field(default=3600, ge=0)  # seconds the broker keeps our session
    # Servers in one group share the device reports (MQTT 5 `$share/<group>/...`): set it to run
    # several stateless server processes on one PostgreSQL. Empty (the default, one process): a
    # plain subscription. Mosquitto 2.0.11 loses QoS 1 messages it had accepted for a shared
    # subscription when it restarts (52 and 184 of 2,000 in two runs here; none for a plain
    # one), so one process does not use a shared subscription it does not need.
    mqtt_shared_group: str = ""
    mqtt_keepalive_s: int = Field(default=30, ge=5)  # seconds
    mqtt_reconnect_min_s: int = Field(default=1, ge=1)  # seconds, first reconnect backoff
    mqtt_reconnect_max_s: int = Field(default=30, ge=1)  # seconds, backoff cap

    # Signing: in development a missing key is generated; production refuses to start.
    signing_key_path: Path | None = None  # default: data_dir/keys/signing.pem
    manifest_ttl_days: int = Field(default=30, ge=1)  # days a signed manifest stays valid
    # Root of trust (see server.release.trust): directory of <n>.root.json; in development a root is
    # generated there when missing, production refuses to start without one.
    trust_dir: Path | None = None  # default: data_dir/trust (env EDGELOOP_TRUST_DIR)
    root_ttl_days: int = Field(default=365, ge=1)  # days a generated/signed root stays valid

    # Retraining.
    retrain_threshold: int = Field(default=1000, ge=1)  # accepted samples that trigger a job
    # Seconds after a line's last training ends before a threshold job may start (a line's
    # config `cooldown_s` wins). 0: none. Samples keep being stored meanwhile.
    retrain_cooldown_s: float = Field(default=0.0, ge=0)
    # Niceness of the trainer subprocess (0-19): training takes only the CPU serving leaves.
    training_nice: int = Field(default=10, ge=0, le=19)
    training_python: str = sys.executable
    training_timeout_s: float = Field(default=3600.0, gt=0)  # seconds per training subprocess
    train_max_golden_drop: float = 0.03  # passed to the trainer's gate
    train_min_field_gain: float = 0.0  # passed to the trainer's gate
    job_poll_s: float = Field(default=1.0, gt=0)  # seconds between looks for queued jobs
    bootstrap_line: str = ""  # e.g. "digits": created with an initial job at startup if missing
    bootstrap_trainer: str = "sklearn-mlp"
    # Training config file (.toml/.json, see training.config) of the bootstrap line; when set it
    # wins over bootstrap_trainer.
    bootstrap_config: Path | None = None
    # Where `config_path` of POST /api/v1/model-lines is looked up (default data_dir/line-configs).
    line_config_dir: Path | None = None

    # Durable training queue.
    training_max_attempts: int = Field(default=3, ge=1, le=100)  # claims per job before failing
    training_retry_backoff_s: float = Field(default=5.0, ge=0)  # seconds, doubled per attempt
    job_heartbeat_s: float = Field(default=2.0, gt=0)  # seconds between runner heartbeats
    job_lease_s: float = Field(default=30.0, gt=0)  # seconds without heartbeat = runner is dead

    # Training workers (server.retrain.worker; `edgeloop worker` on any machine). The server
    # registers, signs and rolls out what workers trained (server.retrain.registrar).
    # embedded_worker: this server process also trains (a worker thread). None: on in
    # development (one machine, the demo), off in production (run `edgeloop worker` instead).
    embedded_worker: bool | None = None
    registrar_poll_s: float = Field(default=1.0, gt=0)  # seconds between looks for trained jobs
    # A registration that fails for a reason of the server's (signing, the database, the artifact
    # store) is tried again after register_retry_backoff_s (seconds, doubled per failure); the
    # register_attempts-th failure fails the job, so the line can train again.
    register_attempts: int = Field(default=5, ge=1, le=100)
    register_retry_backoff_s: float = Field(default=30.0, ge=0)

    # Rollouts.
    auto_rollout: bool = True  # a gated new version gets a rollout in pending_approval
    rollout_tick_s: float = Field(default=2.0, gt=0)  # seconds between engine ticks
    canary_percent: int = Field(default=20, ge=1, le=100)  # percent of the line's devices
    min_labelled: int = Field(default=50, ge=0)  # labelled canary inferences needed to judge
    max_accuracy_drop: float = Field(default=0.02, ge=0)  # absolute, vs the control group
    max_error_rate: float = Field(default=0.01, ge=0)  # errors / inferences on the canary
    max_latency_ratio: float = Field(default=2.0, gt=0)  # canary p95 / control p95
    latency_slack_ms: float = Field(default=1.0, ge=0)  # ms added so tiny latencies don't flap
    canary_min_soak_s: float = Field(default=10.0, ge=0)  # seconds the canary must run
    install_timeout_s: float = Field(default=120.0, gt=0)  # seconds without progress: timed out
    max_failed_ratio: float = Field(default=0.2, ge=0, le=1)  # failed / wave devices: pause
    # Default plan of a rollout created without one (see server.rollout.plan): "10,50,100"
    # (cumulative percents) or a JSON list of wave objects; empty: canary_percent, then 100.
    rollout_plan: str = ""
    wave_success_pct: float = Field(default=90.0, ge=0, le=100)  # committed % to move on
    wave_min_soak_s: float = Field(default=0.0, ge=0)  # seconds, waves after the canary
    abort_failure_pct: float = Field(default=50.0, ge=0, le=100)  # failed % of a wave: roll back
    abort_min_devices: int = Field(default=1, ge=1)  # settled devices before abort applies
    accuracy_z: float = Field(default=2.0, ge=0)  # significance an accuracy drop must reach
    # Per-class recall gate: a class is judged once it has this many labelled samples (new and
    # reference side); its recall may not drop by more than max_class_recall_drop (absolute).
    gate_min_class_support: int = Field(default=20, ge=1)  # labelled samples of one class
    max_class_recall_drop: float = Field(default=0.10, ge=0, le=1)  # absolute recall
    rollout_max_retries: int = Field(default=2, ge=0, le=10)  # re-sends to a failed device
    rollout_retry_backoff_s: float = Field(default=10.0, ge=0)  # seconds, doubled per retry
    quarantine_failures: int = Field(default=3, ge=1)  # failed attempts before quarantine
    quarantine_s: float = Field(default=3600.0, ge=0)  # seconds a quarantined device sits out

    # Identity (server.identity.auth). admin_token is the bootstrap admin operator's bearer token;
    # empty in development means DEV_ADMIN_TOKEN (documented, never for production: startup
    # refuses).
    admin_token: str = ""
    four_eyes: bool = False  # whoever created a rollout cannot approve it
    enrollment_token_ttl_s: float = Field(default=86400.0, gt=0)  # seconds, default lifetime
    # When set, the server rewrites Mosquitto's password_file and acl_file here on every
    # enroll/revoke and signals the broker to reload (SIGHUP to the pid in broker_pid_file).
    broker_config_dir: Path | None = None
    broker_pid_file: Path | None = None
    # Owner (uid) given to the 0600 broker files when the server runs as root and the broker
    # as another user (docker: eclipse-mosquitto is uid 1883). None: keep the server's.
    broker_file_uid: int | None = None
    # A fleet bootstrap token created at startup (hash stored) if missing: lets an image or
    # docker-compose carry it. Empty: none; operators mint tokens with the API/CLI instead.
    enrollment_token: str = ""
    enrollment_token_uses: int = Field(default=1000, ge=1)  # devices it may enroll
    mqtt_username: str = ""  # the server's own broker login; empty: anonymous
    mqtt_password: str = ""

    # MQTT over TLS and brokers that are a cluster (issue 15; docs/operating-the-server.md).
    # The bridge's TLS (contract.mqtt_tls): production refuses plain MQTT unless
    # mqtt_allow_plaintext, and refuses mqtt_tls_insecure (no host name check).
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None  # PEM CAs trusted for the broker (None: the system's)
    mqtt_client_cert: Path | None = None  # PEM client certificate, when the broker wants one
    mqtt_client_key: Path | None = None  # its PEM key (None: inside mqtt_client_cert)
    mqtt_tls_insecure: bool = False  # skip the broker host name check (development only)
    mqtt_allow_plaintext: bool = False  # production: allow plain MQTT anyway
    # Shared secret of the HTTP auth/ACL endpoint clustered brokers call (/api/v1/broker/...,
    # server.api.routes.broker): sent as "Authorization: Bearer <secret>" or as the password
    # of HTTP basic auth. Empty: the endpoint answers anyone in development and no one in
    # production.
    broker_auth_secret: str = Field(default="", repr=False)

    # Monitoring (server.monitoring): device summaries are merged per model version, device
    # group and window of the server's receive clock, scored against the model's reference and
    # judged by the alert rules (drift, estimated_accuracy, live_accuracy, latency, error_rate).
    monitor_window_s: float = Field(default=300.0, ge=1, le=86_400)  # seconds per window
    # Seconds after a window ends before it is evaluated (reports still in the ingest batch).
    monitor_close_delay_s: float = Field(default=10.0, ge=0, le=3600)
    monitor_tick_s: float = Field(default=5.0, gt=0)  # seconds between evaluator looks
    monitor_max_windows_per_tick: int = Field(default=50, ge=1)  # windows per line per tick
    monitor_retention_s: float = Field(default=7 * 86_400.0, gt=0)  # seconds summaries are kept
    drift_alpha: float = Field(default=0.01, gt=0, lt=1)  # per-window false-alarm rate
    drift_null_draws: int = Field(default=40_000, ge=100, le=1_000_000)  # resamples/threshold
    # >= 1: a window of n samples is held to the threshold of n / dispersion (repeated scenes).
    drift_dispersion: float = Field(default=1.0, ge=1)
    # Rules that are evaluated (a JSON list in EDGELOOP_ALERT_RULES); all by default.
    alert_rules: list[str] = Field(
        default=["drift", "estimated_accuracy", "live_accuracy", "latency", "error_rate"]
    )
    # Hysteresis per rule, overriding server.monitoring.rules.DEFAULT_POLICIES, e.g.
    # {"drift": {"raise_after": 2, "clear_after": 3, "min_samples": 100}} (JSON in the env).
    alert_policies: dict[str, dict[str, int]] = Field(default={})
    alert_max_accuracy_drop: float = Field(default=0.05, ge=0, le=1)  # below reference - this
    alert_max_latency_p95_ms: float = Field(default=50.0, gt=0)  # milliseconds
    alert_max_error_rate: float = Field(default=0.01, ge=0, le=1)  # errors / inferences
    # Alerts are POSTed (JSON) to this URL when raised and cleared; empty: no webhook.
    alert_webhook_url: str = ""
    # When set, each POST carries X-Edgeloop-Signature: sha256=HMAC-SHA256(secret, body).
    alert_webhook_secret: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)  # seconds per POST
    webhook_max_attempts: int = Field(default=10, ge=1, le=100)  # POSTs before giving up
    webhook_backoff_s: float = Field(default=2.0, ge=0)  # seconds, doubled per failed attempt
    webhook_backoff_max_s: float = Field(default=900.0, ge=0)  # seconds, the backoff's cap
    webhook_tick_s: float = Field(default=1.0, gt=0)  # seconds between looks for deliveries

    # Capture policies and the labelling queue (issue 14; server.monitoring.capture,
    # server.intake.labelling). A line opts in with ``[capture]`` in its training config.
    enable_capture_publisher: bool = True  # issue signed capture policies on drift alerts
    capture_tick_s: float = Field(default=5.0, gt=0)  # seconds between publisher looks
    capture_default_ttl_s: float = Field(default=3600.0, ge=60, le=7 * 86_400)  # default policy
    labels_max_import_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)  # one import body

    # Background services (tests turn them off and drive the cores directly).
    enable_mqtt: bool = True
    enable_rollout_engine: bool = True
    enable_job_runner: bool = True
    enable_ingest_writer: bool = True
    enable_monitor_evaluator: bool = True
    enable_webhook_sender: bool = True

    # Limits.
    ingest_queue_max: int = Field(default=100_000, ge=1)  # messages waiting to be written
    ingest_batch_max: int = Field(default=500, ge=1)  # messages per write transaction
    ingest_batch_wait_s: float = Field(default=0.2, gt=0)  # seconds to fill a batch
    max_samples_per_batch: int = Field(default=1000, ge=1)  # samples per upload request
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)  # bytes per request body

    # Poisoning guard (server.intake.upload_limits, server.intake.screening). Rate: per server
    # process.
    sample_rate_per_device_per_min: float = Field(default=1200.0, ge=0)  # samples/min; 0: off
    sample_burst_per_device: int = Field(default=2000, ge=1)  # samples a device may send at once
    sample_quota_per_device_per_day: int = Field(default=50_000, ge=0)  # samples/UTC day; 0: off
    # Uploads processed at once by this server process; more wait their turn holding no thread, so
    # uploads never hold every worker thread and every turn at the database writer that approvals
    # and device reports need. One that waits sample_upload_wait_s seconds gets 503 (the agent
    # keeps the batch and retries); keep it under the agents' HTTP timeout (10 s).
    sample_uploads_in_flight: int = Field(default=4, ge=1)
    sample_upload_wait_s: float = Field(default=5.0, ge=0)
    screen_labels: bool = True  # label screening against champion + nearest neighbours
    screen_k: int = Field(default=7, ge=1)  # neighbours consulted
    screen_min_neighbour_agreement: int = Field(default=1, ge=1)  # of screen_k sharing the label
    # of screen_k that must carry the champion's label instead (model and data agree)
    screen_min_neighbour_contradiction: int = Field(default=3, ge=1)
    screen_reference_max: int = Field(default=5000, ge=0)  # accepted samples used as neighbours
    screen_device_min_samples: int = Field(default=20, ge=1)  # before the device check applies
    screen_device_max_quarantine_ratio: float = Field(default=0.5, ge=0, le=1)  # fraction

    @property
    def signing_key_file(self) -> Path:
        return self.signing_key_path or self.data_dir / "keys" / "signing.pem"

    @property
    def trust_dir_path(self) -> Path:
        return self.trust_dir or self.data_dir / "trust"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def runs_embedded_worker(self) -> bool:
        """Whether this server process trains too (see ``embedded_worker``)."""
        if self.embedded_worker is not None:
            return self.embedded_worker
        return self.environment == "development"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def line_configs_dir(self) -> Path:
        return self.line_config_dir or self.data_dir / "line-configs"

    @property
    def effective_admin_token(self) -> str:
        """The admin token in force (DEV_ADMIN_TOKEN when unset in development)."""
        if self.admin_token:
            return self.admin_token
        return DEV_ADMIN_TOKEN if self.environment == "development" else ""

    @property
    def mqtt_active(self) -> bool:
        return self.mqtt_enabled and self.enable_mqtt
