"""Server settings (pydantic-settings, environment prefix ``EDGELOOP_``).

Nothing here runs at import time: ``Settings()`` is built by the caller (``server.main.run`` or a
test) and handed to ``create_app``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server, each with its unit."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    database_url: str = "sqlite:///./var/edgeloop.db"
    data_dir: Path = Path("./var")
    public_url: str = "http://127.0.0.1:8000"  # base of absolute artifact URLs sent to devices
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # MQTT: mqtt_enabled says the deployment uses a broker; enable_mqtt lets a test build an
    # app without the bridge thread.
    mqtt_enabled: bool = True
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    # Must be stable across restarts and unique per server process (the broker keeps the session
    # and queues device reports while the server is down). Empty: edgeloop-server-<host>-<port>.
    mqtt_client_id: str = ""
    mqtt_session_expiry_s: int = Field(default=3600, ge=0)  # seconds the broker keeps our session
    # Servers in one group share the device reports (MQTT 5 `$share/<group>/...`): run several
    # stateless server processes on one PostgreSQL. Empty: every process receives every report.
    mqtt_shared_group: str = "edgeloop-server"
    mqtt_keepalive_s: int = Field(default=30, ge=5)  # seconds
    mqtt_reconnect_min_s: int = Field(default=1, ge=1)  # seconds, first reconnect backoff
    mqtt_reconnect_max_s: int = Field(default=30, ge=1)  # seconds, backoff cap

    # Signing: in development a missing key is generated; production refuses to start.
    signing_key_path: Path | None = None  # default: data_dir/keys/signing.pem
    manifest_ttl_days: int = Field(default=30, ge=1)  # days a signed manifest stays valid

    # Retraining.
    retrain_threshold: int = Field(default=1000, ge=1)  # accepted samples that trigger a job
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
    # Default plan of a rollout created without one (see server.rollout_plan): "10,50,100"
    # (cumulative percents) or a JSON list of wave objects; empty: canary_percent, then 100.
    rollout_plan: str = ""
    wave_success_pct: float = Field(default=90.0, ge=0, le=100)  # committed % to move on
    wave_min_soak_s: float = Field(default=0.0, ge=0)  # seconds, waves after the canary
    abort_failure_pct: float = Field(default=50.0, ge=0, le=100)  # failed % of a wave: roll back
    abort_min_devices: int = Field(default=1, ge=1)  # settled devices before abort applies
    accuracy_z: float = Field(default=2.0, ge=0)  # significance an accuracy drop must reach
    rollout_max_retries: int = Field(default=2, ge=0, le=10)  # re-sends to a failed device
    rollout_retry_backoff_s: float = Field(default=10.0, ge=0)  # seconds, doubled per retry
    quarantine_failures: int = Field(default=3, ge=1)  # failed attempts before quarantine
    quarantine_s: float = Field(default=3600.0, ge=0)  # seconds a quarantined device sits out

    # Background services (tests turn them off and drive the cores directly).
    enable_mqtt: bool = True
    enable_rollout_engine: bool = True
    enable_job_runner: bool = True
    enable_ingest_writer: bool = True

    # Limits.
    ingest_queue_max: int = Field(default=100_000, ge=1)  # messages waiting to be written
    ingest_batch_max: int = Field(default=500, ge=1)  # messages per write transaction
    ingest_batch_wait_s: float = Field(default=0.2, gt=0)  # seconds to fill a batch
    max_samples_per_batch: int = Field(default=1000, ge=1)  # samples per upload request
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)  # bytes per request body

    @property
    def signing_key_file(self) -> Path:
        return self.signing_key_path or self.data_dir / "keys" / "signing.pem"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def line_configs_dir(self) -> Path:
        return self.line_config_dir or self.data_dir / "line-configs"

    @property
    def mqtt_active(self) -> bool:
        return self.mqtt_enabled and self.enable_mqtt
