"""Everything one server instance runs, built from Settings (no import-time singletons)."""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.core.config import Settings
from server.core.errors import ConflictError
from server.db import registry
from server.db.base import utcnow
from server.db.engine import make_engine, make_read_sessionmaker, make_sessionmaker
from server.db.migrate import require_current
from server.fleet.broker_tls import bridge_tls_context
from server.fleet.ingest import IngestWriter
from server.fleet.mqtt_bridge import IngestItem, MqttBridge, RecordingPublisher
from server.identity.broker_acl import sync_broker
from server.identity.enrollment import ensure_enrollment_token, revoked_device_ids
from server.intake.screening import Screener, screen_config
from server.intake.upload_limits import SampleRateLimiter, UploadSlots
from server.monitoring.alerts import RaisedAlert, RetrainHook
from server.monitoring.capture import CapturePublisher
from server.monitoring.evaluator import MonitorEvaluator
from server.monitoring.references import ReferenceBook
from server.monitoring.webhook import WebhookSender
from server.release.artifacts import ArtifactStore, open_artifact_store
from server.release.signing import (
    Signer,
    audit_published_roots,
    load_signer,
    release_first_champion,
)
from server.retrain.jobs import JobRunner
from server.retrain.line_config import bootstrap_line_config
from server.retrain.registration import RegisteredVersion
from server.retrain.scheduler import retrain_for_alert
from server.rollout.engine import RolloutEngine
from server.rollout.queries import auto_rollout
from server.rollout.targets import TargetPublisher

log = logging.getLogger(__name__)

DIGITS_INPUT_SPEC = {"name": "input", "shape": [-1, 64], "dtype": "float32", "min": 0.0, "max": 1.0}
DIGITS_LABELS = [str(i) for i in range(10)]


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    signer: Signer
    store: ArtifactStore
    ingest_queue: queue.Queue[IngestItem]
    ingest: IngestWriter
    publisher: TargetPublisher
    bridge: MqttBridge | None
    rollouts: RolloutEngine
    jobs: JobRunner
    references: ReferenceBook  # monitoring references of the versions, read once
    monitor: MonitorEvaluator  # closes monitoring windows, raises and clears alerts
    webhook: WebhookSender  # delivers alerts to Settings.alert_webhook_url
    clock: Callable[[], datetime] = utcnow
    screener: Screener | None = None  # label screening of uploaded samples
    # Sessions for requests that only read (GET, HEAD, authentication); see
    # server.db.engine.make_read_sessionmaker. None: use ``sessions``.
    read_sessions: sessionmaker[Session] | None = None
    sample_limiter: SampleRateLimiter | None = None  # per-device upload rate (this process)
    upload_slots: UploadSlots | None = None  # sample uploads processed at once (this process)
    # Revoked device ids (loaded at start, added to on revoke): the bridge drops their reports.
    revoked_devices: set[str] = field(default_factory=set)
    # Issues signed capture policies for drifting groups (None: built without one).
    capture: CapturePublisher | None = None
    _started: list[str] = field(default_factory=list)
    _announcing: threading.Lock = field(default_factory=threading.Lock)

    def announce_all_targets(self) -> None:
        """Announce every device's target again, in a thread of its own (the MQTT bridge calls
        this from paho's network thread when the broker kept no session of ours, and so may
        have lost the retained targets too). A run already going covers a second call."""
        if not self._announcing.acquire(blocking=False):
            return

        def run() -> None:
            try:
                n = self.rollouts.publish_all_targets()
                log.warning("broker had lost our session: %d targets announced again", n)
                if self.capture is not None:
                    self.capture.publish_current()
            except Exception:  # noqa: BLE001 - logged; the next session loss tries again
                log.exception("announcing the targets again failed")
            finally:
                self._announcing.release()

        threading.Thread(target=run, name="announce-targets", daemon=True).start()

    def start(self) -> None:
        """Start the background threads the settings enable."""
        s = self.settings
        if s.enrollment_token:
            with self.sessions() as session:
                ensure_enrollment_token(
                    session,
                    token=s.enrollment_token,
                    max_uses=s.enrollment_token_uses,
                    ttl_s=s.enrollment_token_ttl_s,
                    now=self.clock(),
                )
                try:
                    session.commit()
                except IntegrityError:  # another server process stored it first
                    session.rollback()
        if s.broker_config_dir is not None:
            # The broker's password file and ACL exist (and are current) before anyone logs in.
            sync_broker(self.read_sessions or self.sessions, s)
        # Jobs whose runner died (this server killed mid-training, or another one) go back to
        # the queue; a live runner elsewhere keeps its lease.
        self.jobs.recover()
        if s.enable_ingest_writer:
            self.ingest.start()
            self._started.append("ingest")
        if self.bridge is not None:
            self.bridge.on_session_lost = self.announce_all_targets
            self.bridge.start()
            self._started.append("mqtt")
            self.rollouts.publish_all_targets()
        if s.enable_rollout_engine:
            self.rollouts.start()
            self._started.append("rollouts")
        if s.enable_job_runner:
            # The registrar always; a worker thread only on one machine (development).
            self.jobs.start()
            self._started.append("jobs")
            log.info(
                "training: registrar on; embedded worker %s",
                f"on ({self.jobs.identity})" if self.jobs.worker else "off (run `edgeloop worker`)",
            )
        if s.enable_monitor_evaluator:
            self.monitor.start()
            self._started.append("monitor")
        if s.enable_webhook_sender:
            self.webhook.start()
            self._started.append("webhook")
        if s.enable_capture_publisher and self.capture is not None:
            self.capture.publish_current()
            self.capture.start()
            self._started.append("capture")

    def stop(self) -> None:
        if "capture" in self._started and self.capture is not None:
            self.capture.stop()
        if "monitor" in self._started:
            self.monitor.stop()
        if "webhook" in self._started:
            self.webhook.stop()
        if "jobs" in self._started:
            self.jobs.stop()
        if "rollouts" in self._started:
            self.rollouts.stop()
        # The bridge goes first: paho acknowledges a QoS 1 report when it arrives, so a report
        # taken after the ingest writer's last drain would be lost. Once the bridge is
        # disconnected the broker keeps later reports in the server's persistent session.
        if "mqtt" in self._started and self.bridge is not None:
            self.bridge.stop()
        if "ingest" in self._started:
            self.ingest.stop()
        self._started.clear()
        self.engine.dispose()


def next_stages(settings: Settings, signer: Signer) -> Callable[[Session, RegisteredVersion], None]:
    """What follows a registered version, in the job runner's transaction.

    The line's first champion is released to every device at once (release: sign, make it the
    line's current release); a later candidate gets a rollout pending approval (rollout) when
    ``auto_rollout`` is on. A rejected version goes nowhere.
    """

    def after(session: Session, version: RegisteredVersion) -> None:
        if version.first_champion:
            release_first_champion(
                session,
                signer=signer,
                line_name=version.line,
                model_version=version.version,
                now=version.registered_at,
                ttl_days=settings.manifest_ttl_days,
            )
        elif version.passed and settings.auto_rollout:
            auto_rollout(
                session,
                line=version.line,
                to_version=version.version,
                canary_percent=settings.canary_percent,
                created_by=f"auto (job {version.job_id})",
                now=version.registered_at,
            )

    return after


def retrain_on_alert(settings: Settings) -> RetrainHook:
    """What a raised alert does to training (monitoring -> retrain), in the evaluator's
    transaction: a job with trigger ``alert`` when the line's config lists the alert's rule."""

    def hook(session: Session, alert: RaisedAlert) -> tuple[int | None, str | None]:
        outcome = retrain_for_alert(
            session,
            line=alert.model_line,
            rule=alert.rule,
            alert_id=alert.id,
            model_version=alert.model_version,
            now=alert.raised_at,
            default_cooldown_s=settings.retrain_cooldown_s,
        )
        return outcome.job_id, outcome.note

    return hook


def bootstrap(services: Services) -> None:
    """Create the configured default model line (and its initial job) if it does not exist."""
    s = services.settings
    if not s.bootstrap_line:
        return
    config = bootstrap_line_config(s)
    with services.sessions() as session:
        try:
            registry.create_model_line(
                session,
                name=s.bootstrap_line,
                trainer=config.trainer,
                hyperparams=config.hyperparams,
                input_spec=dict(DIGITS_INPUT_SPEC),
                labels=list(DIGITS_LABELS),
                retrain_threshold=config.retrain_threshold or s.retrain_threshold,
                initial_training=True,
                now=services.clock(),
                training_config=config.to_dict(),
                schedule_s=config.schedule_s,
            )
            log.info("created model line %r with its initial training job", s.bootstrap_line)
        except ConflictError:
            pass


def build_services(settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> Services:
    """Connect the database, load the key, wire the components.

    Raises:
        SchemaError: the database's schema is not this edgeloop's (``edgeloop db upgrade``
            makes it so; the server never migrates, so two servers cannot migrate at once).
    """
    # MQTT TLS settings are refused (ConfigError) before anything is opened.
    tls = bridge_tls_context(settings) if settings.mqtt_active else None
    engine = make_engine(settings.database_url)
    try:
        require_current(engine)
    except BaseException:
        engine.dispose()
        raise
    sessions = make_sessionmaker(engine)
    signer = load_signer(settings)
    store = open_artifact_store(settings)
    references = ReferenceBook(
        store,
        alpha=settings.drift_alpha,
        draws=settings.drift_null_draws,
        dispersion=settings.drift_dispersion,
    )
    ingest_queue: queue.Queue[IngestItem] = queue.Queue(maxsize=settings.ingest_queue_max)
    ingest = IngestWriter(
        sessions=sessions,
        ingest_queue=ingest_queue,
        batch_max=settings.ingest_batch_max,
        batch_wait_s=settings.ingest_batch_wait_s,
        clock=clock,
        check_summary=references.check,
    )
    bridge: MqttBridge | None = None
    publisher: TargetPublisher
    publish_retained: Callable[[str, bytes], None]  # capture policies
    with sessions() as session:
        revoked_devices = revoked_device_ids(session)
    with sessions() as session:
        if audit_published_roots(session, signer, now=clock()):
            session.commit()
    if settings.mqtt_active:
        bridge = MqttBridge(
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            ingest_queue=ingest_queue,
            client_id=settings.mqtt_client_id
            or f"edgeloop-server-{socket.gethostname()}-{settings.port}",
            session_expiry_s=settings.mqtt_session_expiry_s,
            keepalive_s=settings.mqtt_keepalive_s,
            reconnect_min_s=settings.mqtt_reconnect_min_s,
            reconnect_max_s=settings.mqtt_reconnect_max_s,
            shared_group=settings.mqtt_shared_group or None,
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            is_revoked=revoked_devices.__contains__,
            clock=clock,
            tls=tls,
        )
        publisher, publish_retained = bridge, bridge.publish_retained
    else:
        recording = RecordingPublisher()
        publisher, publish_retained = recording, recording.publish_retained
    read_sessions = make_read_sessionmaker(engine)
    rollouts = RolloutEngine(
        settings=settings,
        sessions=sessions,
        signer=signer,
        publisher=publisher,
        clock=clock,
        read_sessions=read_sessions,
    )
    jobs = JobRunner(
        settings=settings,
        sessions=sessions,
        store=store,
        on_registered=next_stages(settings, signer),
        clock=clock,
    )
    webhook = WebhookSender(settings=settings, sessions=sessions, clock=clock)
    monitor = MonitorEvaluator(
        settings=settings,
        sessions=sessions,
        references=references,
        read_sessions=read_sessions,
        clock=clock,
        on_raised=retrain_on_alert(settings),
        wake_webhook=webhook.wake,
        wake_jobs=jobs.wake,
    )
    services = Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        read_sessions=read_sessions,
        signer=signer,
        store=store,
        ingest_queue=ingest_queue,
        ingest=ingest,
        publisher=publisher,
        bridge=bridge,
        rollouts=rollouts,
        jobs=jobs,
        references=references,
        monitor=monitor,
        webhook=webhook,
        clock=clock,
        screener=Screener(screen_config(settings), store),
        sample_limiter=SampleRateLimiter(
            per_min=settings.sample_rate_per_device_per_min,
            burst=settings.sample_burst_per_device,
        ),
        upload_slots=UploadSlots(
            settings.sample_uploads_in_flight, wait_s=settings.sample_upload_wait_s
        ),
        revoked_devices=revoked_devices,
        capture=CapturePublisher(
            settings=settings,
            sessions=sessions,
            signer=signer,
            publish=publish_retained,
            clock=clock,
        ),
    )
    bootstrap(services)
    return services
