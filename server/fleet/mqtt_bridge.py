"""A thin paho-mqtt adapter: inbound device messages go to a bounded queue, targets go out.

Inbound: status (QoS 1), metrics (QoS 0) and monitor summaries (QoS 1) of every device.

Nothing here interprets a message. The paho network thread only puts ``(kind, device_id,
payload, received_at)`` into the ingest queue (``server.fleet.ingest`` parses and writes them), so a
burst from 10,000 devices never blocks the socket on the database. A payload over the message
limit is queued as its size and first bytes (``Oversize``), never whole, and nothing a message
carries can raise out of ``handle`` into paho's network thread.

Targets are retained, QoS 1 and "latest wins", so the publisher coalesces per device: while the
broker is down the pending map holds at most one message per device and is flushed on reconnect.
A reconnect that finds no session of ours on the broker (a broker that restarted without its
state: crashed, replaced, a new cluster node) may also have lost the retained targets, so it
calls ``on_session_lost``, which the server uses to announce every target again.

Over TLS (``tls``: a context from ``contract.mqtt_tls``, built by ``server.fleet.broker_tls``)
a refused broker certificate is a failed connection attempt like a broker that is down: paho
retries with backoff, ``stats.connect_failures`` counts it and ``last_error`` says why.
"""

from __future__ import annotations

import logging
import queue
import ssl
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from contract import TargetMessage, Topics
from contract.messages import MAX_MESSAGE_BYTES
from contract.mqtt_tls import describe_connect_failure
from server.db.base import utcnow
from server.fleet.ingest_parse import Oversize

log = logging.getLogger(__name__)

IngestItem = tuple[str, str, Any, datetime]  # (kind, topic device_id, payload, received_at)


class RecordingPublisher:
    """Publisher used when MQTT is off: remembers what would have been sent (tests read it).

    Like :class:`MqttBridge`, a ``server.rollout.targets.TargetPublisher``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: list[tuple[str, TargetMessage]] = []

    def publish(self, device_id: str, message: TargetMessage) -> None:
        with self._lock:
            self.sent.append((device_id, message))

    def latest(self) -> dict[str, TargetMessage]:
        with self._lock:
            return dict(self.sent)

    def clear(self) -> None:
        with self._lock:
            self.sent.clear()


@dataclass
class BridgeStats:
    received: int = 0
    dropped: int = 0  # ingest queue full
    bad_topic: int = 0
    published: int = 0
    connects: int = 0
    revoked: int = 0  # reports of revoked devices, dropped
    oversize: int = 0  # payloads over MAX_MESSAGE_BYTES, queued as size and head only
    errors: int = 0  # messages whose handling raised (logged; the network thread goes on)
    sessions_lost: int = 0  # reconnects that found no session of ours on the broker
    connect_failures: int = 0  # attempts that failed before MQTT (socket, TLS certificate)


class MqttBridge:
    """One MQTT v5 connection: subscribes to device reports, publishes targets."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ingest_queue: queue.Queue[IngestItem],
        client_id: str | None = None,  # None: an ephemeral id (tests); servers pass a stable one
        keepalive_s: int = 30,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
        topics: Topics | None = None,
        shared_group: str | None = "edgeloop-server",
        session_expiry_s: int = 3600,
        username: str = "",  # the server's broker login (Settings.mqtt_username); "": anonymous
        password: str = "",
        is_revoked: Callable[[str], bool] | None = None,  # drop reports of revoked devices
        clock: Callable[[], datetime] = utcnow,  # stamps received_at (windows are on it)
        tls: ssl.SSLContext | None = None,  # None: plain MQTT
    ) -> None:
        self.host, self.port, self.keepalive_s = host, port, keepalive_s
        self.is_revoked = is_revoked
        self.clock = clock
        # Called on paho's network thread when a reconnect finds no session of ours on the
        # broker; it must return at once (the server hands the work to a thread).
        self.on_session_lost: Callable[[], None] | None = None
        # MQTT 5 shared subscription: several server processes split the device reports
        # between them instead of each writing every report (None: every process gets all).
        self.subscription_prefix = f"$share/{shared_group}/" if shared_group else ""
        self.topics = topics or Topics()
        self.ingest_queue = ingest_queue
        self.stats = BridgeStats()
        self.last_error: str | None = None  # why the last connection attempt failed
        self.connected = threading.Event()
        self._pending: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            # Stable across restarts (and unique per server process: see Settings), so the
            # broker keeps this server's session and queues QoS 1 device reports while it is down.
            client_id=client_id or f"edgeloop-server-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.session_expiry_s = session_expiry_s
        if username:
            self._client.username_pw_set(username, password or None)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        # A callback that raises anyway is logged by paho instead of ending its network thread.
        self._client.suppress_exceptions = True

    # ------------------------------------------------------------ network thread callbacks

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("MQTT connect refused: %s", reason)
            return
        prefix = self.subscription_prefix
        client.subscribe(
            [
                (prefix + self.topics.all_status, 1),
                (prefix + self.topics.all_metrics, 0),
                (prefix + self.topics.all_monitor, 1),
            ]
        )
        present = bool(getattr(_f, "session_present", False))
        reconnect = self.stats.connects > 0  # the first connect follows the startup announcement
        self.stats.connects += 1
        log.info("MQTT connected (session present: %s)", present)
        self.last_error = None
        self.connected.set()
        self._wake.set()
        if reconnect and not present:
            self.stats.sessions_lost += 1
            if self.on_session_lost is not None:
                try:
                    self.on_session_lost()
                except Exception:  # noqa: BLE001 - never raise into paho's network thread
                    log.exception("on_session_lost failed")

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        # paho calls this inside its ``except OSError`` around the attempt, so the exception
        # being handled is the reason (paho passes none): a refused certificate, say.
        reason = describe_connect_failure(sys.exc_info()[1])
        self.stats.connect_failures += 1
        if reason != self.last_error:  # once per distinct reason, not once per retry
            log.warning("MQTT connect to %s:%s failed: %s", self.host, self.port, reason)
        self.last_error = reason

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT disconnected (%s); paho reconnects with backoff", reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.stats.bad_topic += 1
            return
        self.handle(topic, msg.payload)

    def handle(self, topic: str, payload: bytes | bytearray) -> None:
        """Queue one inbound message for the ingest writer (what ``on_message`` does). Never
        raises: a failure is counted in ``stats.errors`` and logged."""
        try:
            parsed = self.topics.parse(topic)
            if parsed is None or parsed[1] not in ("status", "metrics", "monitor"):
                self.stats.bad_topic += 1
                return
            device_id, kind = parsed
            if self.is_revoked is not None and self.is_revoked(device_id):
                # Queued by the broker before the revocation took effect: never ingested.
                self.stats.revoked += 1
                return
            self.stats.received += 1
            body: bytes | Oversize
            if len(payload) > MAX_MESSAGE_BYTES:
                self.stats.oversize += 1
                body = Oversize.of(payload)
            else:
                body = bytes(payload)
            try:
                self.ingest_queue.put_nowait((kind, device_id, body, self.clock()))
            except queue.Full:
                # Metrics are QoS 0 and status is re-sent by the device; a monitor summary is
                # a hole of one period in one device's record (counted here).
                self.stats.dropped += 1
        except Exception:  # noqa: BLE001 - see the docstring: the network thread must go on
            self.stats.errors += 1
            log.exception("MQTT message on %.200r could not be queued", topic)

    # ------------------------------------------------------------ publishing

    def publish(self, device_id: str, message: TargetMessage) -> None:
        with self._lock:
            self._pending[device_id] = message.to_json()
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if not self.connected.is_set():
                continue
            with self._lock:
                batch, self._pending = self._pending, {}
            for n, (device_id, payload) in enumerate(batch.items()):
                info = self._client.publish(
                    self.topics.target(device_id), payload, qos=1, retain=True
                )
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    with self._lock:  # keep anything newer that arrived meanwhile
                        for did, p in list(batch.items())[n:]:
                            self._pending.setdefault(did, p)
                    break
                self.stats.published += 1

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; a broker that is down is retried with backoff."""
        self._stop.clear()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self._client.connect_async(
            self.host,
            self.port,
            keepalive=self.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        self._publisher = threading.Thread(
            target=self._publish_loop, name="mqtt-publisher", daemon=True
        )
        self._publisher.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._publisher is not None:
            self._publisher.join(timeout=10)
            self._publisher = None
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
