"""The Agent: serves the model and runs the update, upload, metrics and bootstrap threads.

One Agent holds no global state, so a simulator can run many in one process, each with its own
MQTT client and ``state_dir``. Threads per agent: paho's loop, the update worker (drives the
state machine of ``states.py``), the uploader, the metrics publisher (also drains the outbox of
reports held while the broker was away), and the bootstrap thread (registration, then an HTTP
poll for the target: continuously until a model serves, then every ``target_poll_interval_s``
while MQTT is disconnected, for networks that block MQTT). The four workers run under a
``Supervisor`` that restarts one that dies; ``status()["workers"]`` says how they are.

Whatever arrives from the network (MQTT target, HTTP target poll) goes through the bounded
``TargetInbox`` and ``parse_target``; any exception while parsing or offering it becomes a
REFUSED report naming the reason, never the end of the update worker.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract import MessageError
from contract.manifest import Manifest
from contract.messages import MAX_TARGET_BYTES, DeviceState, StatusReport, TargetMessage, bounded_id
from contract.topics import Topics
from device_agent.capture import Capture, PendingPrediction, Spool, Uploader
from device_agent.config import AgentConfig
from device_agent.errors import IdentityError, InferenceError, TransportError
from device_agent.fetcher import Fetcher, HttpFetcher, backoff_delay
from device_agent.http import HttpClient, parse_length
from device_agent.identity import enroll, load_credential
from device_agent.inbox import Inbound, TargetInbox, parse_target
from device_agent.metrics import Metrics
from device_agent.monitor import Monitor
from device_agent.mqtt import MqttLink
from device_agent.outbox import Outbox
from device_agent.probation import LiveTracker
from device_agent.runtime import ModelRuntime, freeze_heap, trim_heap, tune_interpreter
from device_agent.store import ModelStore
from device_agent.supervisor import Supervisor
from device_agent.updater import Updater

log = logging.getLogger(__name__)
REGISTER_PATH = "/api/v1/devices/register"
TARGET_PATH = "/api/v1/devices/{device_id}/target"
_JOIN_TIMEOUT_S = 10.0  # seconds stop() waits for each thread


@dataclass(frozen=True)
class Prediction:
    prediction_id: str  # pass to feedback() with the ground truth
    label: int
    confidence: float  # top-class probability, 0..1
    model_version: int  # the model that produced this prediction
    latency_ms: float


class Agent:
    """Coordinates one edge device: serving, updates, capture, uploads and reports.

    Args:
        config: the device's configuration.
        fetcher: artifact fetcher (default: HttpFetcher over ``http``).
        clock: unix-seconds clock used for expiry checks and timestamps (default: time.time).
        http: HTTP client for the server API (default: one owned by the agent).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        fetcher: Fetcher | None = None,
        clock: Callable[[], float] | None = None,
        http: HttpClient | None = None,
    ) -> None:
        self.config = config
        self._clock = clock or time.time
        self._stop = threading.Event()
        self._own_http = http is None
        self._http = http or HttpClient.from_config(config)
        # The per-device credential (HTTP bearer + MQTT password); None until enrolled.
        self._credential = load_credential(config)
        if self._credential:
            self._http.set_bearer(self._credential, origin=config.server_url)
        self.identity_error: str | None = None  # set when the server refused our identity
        self._own_fetcher = fetcher is None
        self._fetcher = fetcher or HttpFetcher(config, client=self._http, stop=self._stop)
        self._store = ModelStore(config.state_dir)
        self._runtime = ModelRuntime(
            intra_op_num_threads=config.intra_op_num_threads,
            graph_optimization=config.graph_optimization,
            min_free_memory_bytes=config.min_free_memory_bytes,
            load_headroom_factor=config.load_headroom_factor,
        )
        self._live = LiveTracker()
        self._live_path = config.state_dir / "live.json"
        self._live.load(self._live_path)
        self._outbox = Outbox(
            config.state_dir / "outbox.jsonl", max_records=config.outbox_max_records
        )
        self._metrics = Metrics(
            device_id=config.device_id,
            model_line=config.model_line,
            clock=self._clock,
            latency_samples_max=config.latency_samples_max,
        )
        self._monitor = Monitor(
            device_id=config.device_id, model_line=config.model_line, clock=self._clock
        )
        self._spool = Spool(
            config.state_dir / "spool",
            batch_max=config.upload_batch_max,
            max_bytes=config.spool_max_bytes,
            fsync=config.spool_fsync,
        )
        self._capture = Capture(
            config, spool=self._spool, metrics=self._metrics, clock=self._clock, live=self._live
        )
        self._uploader = Uploader(config, spool=self._spool, client=self._http, stop=self._stop)
        self._inbox = TargetInbox()
        self._topics = Topics()
        self._mqtt: MqttLink | None = None
        self._updater = Updater(
            config,
            store=self._store,
            runtime=self._runtime,
            fetcher=self._fetcher,
            report=self._publish_status,
            clock=self._clock,
            live=self._live,
            stop=self._stop,
        )
        self._ready = threading.Event()
        self._supervisor = Supervisor(f"agent-{config.device_id}", self._stop)
        self._resumed = False
        self._started = False
        self.registered = False
        self._last_error: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def resume(self) -> bool:
        """Serve the persisted model if it still verifies (no network). Returns True if serving."""
        if not self._resumed:
            self._resumed = True
            if self._updater.resume() is not None:
                self._ready.set()
            self._updater.resume_shadow()
            trim_heap()  # hand back what start-up freed (verification, session building)
            if self.config.freeze_heap:
                freeze_heap()  # later GC passes skip start-up's objects (no 50 ms GIL stalls)
        return self._ready.is_set()

    def start(self) -> None:
        """Resume the persisted model, connect MQTT and start the background threads.

        Never blocks on the server or the broker: both are retried in the background.
        """
        if self._started:
            return
        self._started = True
        tune_interpreter(self.config.switch_interval_s)
        self.resume()
        self._mqtt = MqttLink(
            self.config, self._inbox, outbox=self._outbox, credential=self._credential
        )
        if self._credential is not None or not self.config.bootstrap_token:
            self._start_mqtt()  # else: after enrollment, so the first login has the credential
        for label, target in (
            ("update", self._update_worker),
            ("upload", self._uploader.run),
            ("metrics", self._metrics_loop),
            ("bootstrap", self._bootstrap),
        ):
            self._supervisor.start(label, target)

    def stop(self) -> None:
        """Stop threads, keep unsent samples on disk, disconnect cleanly. Idempotent."""
        self._stop.set()
        self._spool.batch_full.set()  # wake the uploader
        self._supervisor.join(_JOIN_TIMEOUT_S)
        self._updater.drop_shadow()
        if self._mqtt is not None:
            self._mqtt.stop()
            self._mqtt = None
        self._spool.close()
        if self._own_fetcher and isinstance(self._fetcher, HttpFetcher):
            self._fetcher.close()
        if self._own_http:
            self._http.close()

    @property
    def _threads(self) -> list[threading.Thread]:
        """The supervised worker threads (tests look for the bootstrap thread)."""
        return self._supervisor.threads

    @property
    def healthy(self) -> bool:
        """True while no worker is down and the MQTT network thread (once started) runs."""
        mqtt_ok = self._mqtt is None or self._mqtt.loop_alive is not False
        return self._supervisor.healthy and mqtt_ok

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until a verified model serves; True if one does."""
        return self._ready.wait(timeout)

    # ---- serving ---------------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> Prediction:
        """Classify one sample with the model serving at call time.

        Raises:
            NoModelError: no verified model serves yet.
            InferenceError: ONNX Runtime failed (counted as an error in metrics).
            ValueError: ``x`` holds the wrong number of values.
        """
        try:
            raw, loaded = self._runtime.predict(x)
        except InferenceError as exc:
            self._metrics.record_error(exc.model_version)
            serving = self._runtime.current
            if serving is not None:
                self._live.record_error(serving.sha256)
            raise
        pid = uuid.uuid4().hex
        shadow = self._updater.shadow  # read once; the challenger runs off this call's path
        if shadow is not None and shadow.sha256 != loaded.sha256:
            shadow.submit(pid, x, raw.label)
        self._metrics.record_inference(loaded.model_version, raw.latency_ms)
        self._live.record_inference(loaded.sha256, raw.latency_ms)
        if loaded.monitoring is not None and self.config.monitor_interval_s > 0:
            self._monitor.observe(loaded, x, raw.probabilities)
        self._capture.remember(
            pid,
            PendingPrediction(
                x=np.array(x, dtype=np.float32).ravel(),
                label=raw.label,
                confidence=raw.confidence,
                model_version=loaded.model_version,
                sha256=loaded.sha256,
            ),
        )
        return Prediction(
            prediction_id=pid,
            label=raw.label,
            confidence=raw.confidence,
            model_version=loaded.model_version,
            latency_ms=raw.latency_ms,
        )

    @property
    def manifest(self) -> Manifest | None:
        """The verified manifest of the model serving now, if any."""
        serving = self._runtime.current
        return serving.manifest if serving else None

    def feedback(self, prediction_id: str, true_label: int) -> bool:
        """Ground truth for an earlier prediction; True if the sample was captured for upload.

        Raises:
            UnknownPredictionError: the id is unknown, already labelled, or was evicted.
        """
        captured = self._capture.feedback(prediction_id, true_label)
        shadow = self._updater.shadow
        if shadow is not None:
            shadow.label(prediction_id, true_label)
        return captured

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of where this device stands."""
        serving = self._runtime.current
        cur = self._updater.current
        spool = self._spool.stats()
        st = self._updater.persisted
        job = st.update
        return {
            "device_id": self.config.device_id,
            "model_line": self.config.model_line,
            "state": self._updater.last_state.value,
            "serving": serving is not None,
            "model_version": serving.model_version if serving else None,
            "release": cur.release if cur else None,
            "highest_release": self._updater.highest_release,
            "trust_root_version": self._updater.root_version,  # 0: legacy pinned keys
            "rollout_id": cur.rollout_id if cur else None,
            "sha256": serving.sha256 if serving else None,
            "registered": self.registered,
            "enrolled": self._credential is not None,
            "identity_error": self.identity_error,
            "mqtt_connected": bool(self._mqtt and self._mqtt.connected.is_set()),
            # Why the broker link is down (a refused TLS certificate, a refused login); None
            # while connected or before the first attempt.
            "mqtt_error": None
            if self._mqtt is None
            else self._mqtt.last_error or self._mqtt.refused,
            "inferences": self._metrics.total_inferences,
            "shadow": self._shadow_status(),
            "pending_labels": len(self._capture.pending),
            "spool": {
                "pending": spool.pending,
                "uploaded": spool.uploaded,
                "dropped": spool.dropped,
                "rejected": spool.rejected,
                "sent": self._uploader.sent,
                "server_duplicates": self._uploader.server_duplicates,
            },
            "update": None
            if job is None
            else {
                "state": job.state.value,
                "release": job.release or None,
                "model_version": job.model_version or None,
                "attempts": job.attempts,
                "reason": job.reason,
                "probation_s": round(self._updater.probation_elapsed(), 1)
                if job.state == DeviceState.PROBATION
                else None,
            },
            "slots": {
                "current": cur.sha256 if cur else None,
                "previous": st.previous.sha256 if st.previous else None,
            },
            "refused": [
                {"release": r.release, "model_version": r.model_version, "reason": r.reason}
                for r in st.refused[-5:]
            ],
            "outbox": {"pending": len(self._outbox), "dropped": self._outbox.dropped},
            "monitor": {
                "enabled": bool(serving and serving.monitoring and self.config.monitor_interval_s),
                "pending": self._monitor.pending,
                "summaries": self._monitor.summaries,
            },
            "healthy": self.healthy,
            "workers": self._worker_status(),
            "last_error": self._updater.last_error or self._uploader.last_error or self._last_error,
        }

    def _worker_status(self) -> dict[str, Any]:
        workers: dict[str, Any] = self._supervisor.status()
        if self._mqtt is not None and self._mqtt.loop_alive is not None:
            workers["mqtt"] = {"state": "running" if self._mqtt.loop_alive else "down"}
        return workers

    def _shadow_status(self) -> dict[str, Any] | None:
        shadow = self._updater.shadow
        if shadow is None:
            return None
        return {
            "model_version": shadow.model_version,
            "compared": shadow.compared_total,
            "skipped": shadow.skipped,
        }

    # ---- threads ---------------------------------------------------------------------------
    def _publish_status(self, report: StatusReport) -> None:
        if self._mqtt is not None:
            self._mqtt.publish_status(report)
        else:  # before start() (resume) or after stop(): hold it for the next connection
            self._outbox.add(self._topics.status(self.config.device_id), report.to_json(), qos=1)

    def _next_target(self, timeout: float) -> TargetMessage | None:
        """Wait for a target; coalesce a burst to the latest message. None on timeout, on a
        cleared retained target, or when the message was refused (reported here)."""
        item, skipped = self._inbox.take_newest(timeout)
        if item is None:
            return None
        if skipped:
            log.info("coalesced %d older target message(s) into the newest", skipped)
        try:
            return parse_target(item)
        except MessageError as exc:
            reason = f"invalid target message ({item.source}): {exc}"
        except Exception as exc:  # a parser bug must cost one message, never the worker
            log.exception("target message (%s) broke the parser", item.source)
            reason = f"invalid target message ({item.source}): {type(exc).__name__}: {exc}"
        self._updater.refuse_message(reason)
        return None

    def _offer(self, target: TargetMessage) -> None:
        try:
            self._updater.offer(target)
        except Exception as exc:  # persisted state could not take it: report, keep going
            log.exception("target could not be accepted")
            self._updater.refuse_message(f"target not accepted: {type(exc).__name__}: {exc}")

    def _update_worker(self) -> None:
        """Feed targets to the updater and run its state machine one step at a time."""
        while not self._stop.is_set():
            busy = self._updater.busy
            target = self._next_target(timeout=0.0 if busy else 0.5)
            if target is not None:
                self._offer(target)
            if self._updater.busy:
                try:
                    self._updater.step()
                except Exception:  # the worker must survive anything; a model keeps serving
                    log.exception("update worker error")
                    self._stop.wait(1.0)
            if self._runtime.current is not None:
                self._ready.set()

    def _poll_target(self, url: str) -> Inbound | None:
        """GET the target, reading at most ``MAX_TARGET_BYTES`` of it; None unless 200.

        Raises:
            TransportError: the request failed.
        """
        with self._http.stream("GET", url) as resp:
            if resp.status_code != 200:
                resp.read_at_most(64 * 1024)  # a short error body: read it, keep the connection
                return None
            declared = parse_length(resp.headers.get("Content-Length"))
            if declared is not None and declared > MAX_TARGET_BYTES:
                return Inbound.too_large("http", declared)  # refused unread
            body = resp.read_at_most(MAX_TARGET_BYTES)
        return Inbound.of("http", body)

    def _metrics_loop(self) -> None:
        next_window = time.monotonic() + self.config.metrics_interval_s
        monitor_s = self.config.monitor_interval_s
        next_monitor = time.monotonic() + monitor_s
        while not self._stop.wait(min(0.5, self.config.metrics_interval_s)):
            if self._mqtt is not None:
                self._mqtt.drain_outbox()
            if monitor_s > 0:
                self._monitor.flush()  # bin buffered rows here, not on an inference thread
                if time.monotonic() >= next_monitor:
                    next_monitor += monitor_s
                    self._publish_monitor()
            if time.monotonic() < next_window:
                continue
            next_window += self.config.metrics_interval_s
            serving = self._runtime.current
            cur = self._updater.current
            rollout = cur.rollout_id if cur and serving and cur.sha256 == serving.sha256 else None
            rollout = bounded_id(rollout)  # unsigned, and maybe persisted by an older agent
            shadow = self._updater.shadow
            reports = self._metrics.snapshot_and_reset(
                serving_version=serving.model_version if serving else None,
                rollout_id=rollout,
                shadow=shadow.snapshot_and_reset() if shadow is not None else None,
            )
            try:
                self._live.dump(self._live_path)
            except OSError as exc:
                log.warning("cannot persist live statistics: %s", exc)
            if self._mqtt is not None:
                for r in reports:
                    self._mqtt.publish_metrics(r)

    def _publish_monitor(self) -> None:
        """Close the monitoring period and publish its summaries (QoS 1, outbox offline)."""
        serving = self._runtime.current
        cur = self._updater.current
        release = cur.release if cur and serving and cur.sha256 == serving.sha256 else None
        summaries = self._monitor.snapshot_and_reset(
            serving_sha256=serving.sha256 if serving else None, release=bounded_id(release)
        )
        for summary in summaries:
            if self._mqtt is not None:
                self._mqtt.publish_monitor(summary)
            else:
                self._outbox.add(
                    self._topics.monitor(self.config.device_id), summary.to_json(), qos=1
                )

    def _start_mqtt(self) -> None:
        if self._mqtt is None:
            return
        try:
            self._mqtt.start()
        except TransportError as exc:
            self._last_error = str(exc)
            log.error("%s", exc)

    def _enroll(self) -> bool:
        """Enroll with the bootstrap token unless a credential is stored (retrying transport
        errors); False when the server refused (reported once, never retried)."""
        cfg = self.config
        attempt = 0
        while self._credential is None and not self._stop.is_set():
            try:
                credential = enroll(cfg, self._http)
            except IdentityError as exc:
                self.identity_error = self._last_error = str(exc)
                log.error("%s", exc)
                return False
            except TransportError as exc:
                self._last_error = f"enroll: {type(exc).__name__}: {exc}"
                delay = backoff_delay(attempt, cfg.connect_retry_s, cfg.backoff_cap_s)
                attempt += 1
                self._stop.wait(delay)
                continue
            self._credential = credential
            self._http.set_bearer(credential, origin=cfg.server_url)
            if self._mqtt is not None:
                self._mqtt.set_credential(credential)
                self._start_mqtt()
        return self._credential is not None

    def _bootstrap(self) -> None:
        """Enroll if needed, register (retrying), then poll for a target over HTTP until a
        model serves."""
        cfg = self.config
        if not self._enroll():
            return
        body = {
            "device_id": cfg.device_id,
            "model_line": cfg.model_line,
            "hardware": cfg.hardware,
            "agent_version": cfg.agent_version,
        }
        attempt = 0
        while not self._stop.is_set():
            try:
                resp = self._http.post(cfg.server_url + REGISTER_PATH, json=body)
                if resp.is_success:
                    self.registered = True
                    break
                if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                    self._last_error = (
                        f"register refused: HTTP {resp.status_code} {resp.text[:200]}"
                    )
                    log.error("%s", self._last_error)
                    if resp.status_code in (401, 403):  # revoked or unknown: stop asking
                        self.identity_error = self._last_error
                        return
                    break
                self._last_error = f"register: HTTP {resp.status_code}"
            except TransportError as exc:
                self._last_error = f"register: {type(exc).__name__}: {exc}"
            delay = backoff_delay(attempt, cfg.connect_retry_s, cfg.backoff_cap_s)
            attempt += 1
            if self._stop.wait(delay):
                return
        last: str | None = None  # sha256 of the last body handed over
        url = cfg.server_url + TARGET_PATH.format(device_id=cfg.device_id)
        mqtt_down_since: float | None = None
        next_poll = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            connected = bool(self._mqtt and self._mqtt.connected.is_set())
            mqtt_down_since = None if connected else (mqtt_down_since or now)
            fallback = mqtt_down_since is not None and now - mqtt_down_since >= min(
                cfg.target_poll_interval_s, 10 * cfg.connect_retry_s
            )
            if (not self._ready.is_set() or fallback) and now >= next_poll:
                next_poll = now + (
                    cfg.connect_retry_s if not self._ready.is_set() else cfg.target_poll_interval_s
                )
                try:
                    item = self._poll_target(url)
                except TransportError as exc:
                    log.debug("target poll failed: %s", exc)
                    item = None
                if item is not None:
                    digest = hashlib.sha256(item.payload or str(item.size).encode()).hexdigest()
                    if digest != last:
                        last = digest
                        self._inbox.put(item)
            if self._stop.wait(min(cfg.connect_retry_s, 1.0)):
                return
