"""Thin paho-mqtt 2.x adapter: connect, subscribe to our target topic, publish reports.

No business logic runs on paho's network thread: ``on_message`` only puts the payload on the
bounded ``TargetInbox`` that the agent's update worker consumes (a payload over
``MAX_TARGET_BYTES`` is kept as its size only, for the refusal report), and it cannot raise.
The broker is told ``MAX_MQTT_PACKET_BYTES`` (MQTT v5 Maximum Packet Size), so it never sends
this device a packet larger than that: paho would read any packet into memory whole.

No broker session is kept by default (clean start, session expiry 0): the server retains the
latest target on the device's topic, so a device that was offline gets it when it subscribes
again (it subscribes on every connect), and its own reports wait in its own outbox. Nothing is
gained by a persistent session, and it costs: the broker holds every offline device's session,
and Mosquitto up to 2.0.22 corrupts its session-expiry list when a reload (SIGHUP, which the
server sends after each enrollment) re-checks sessions restored from its persistence file, then
crashes in ``session_expiry__remove`` (mosquitto#3418, PR #3341); seen here with 2.0.11 after a
broker restart. ``mqtt_session_expiry_s`` > 0 asks for a persistent session again.

Over TLS (``mqtt_tls``, see ``contract.mqtt_tls``) the broker's certificate is verified against
``mqtt_ca_file`` and must name the host connected to. A refused certificate is a connection
failure like a broker that is down: paho's thread goes on retrying with backoff, and
``last_error`` says why (``"TLS: the broker's certificate was refused: ..."``), for the agent's
status and the operator.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from contract.messages import MAX_TARGET_BYTES, MetricsReport, StatusReport
from contract.monitoring import MonitorSummary
from contract.mqtt_tls import MqttTlsError, describe_connect_failure, describe_early_disconnect
from contract.topics import Topics
from device_agent.config import AgentConfig
from device_agent.errors import ConfigError, TransportError
from device_agent.inbox import Inbound, TargetInbox
from device_agent.outbox import Outbox

log = logging.getLogger(__name__)

# Bytes, the largest MQTT packet the broker may send us. Above MAX_TARGET_BYTES on purpose: a
# target between the two arrives and is refused with a report; a larger packet is discarded by
# the broker (MQTT v5 3.1.2.11.4) before it can cost this device memory.
MAX_MQTT_PACKET_BYTES = 8 * MAX_TARGET_BYTES


class MqttLink:
    """One device's MQTT connection. ``start`` never blocks on the broker being up."""

    def __init__(
        self,
        config: AgentConfig,
        inbox: TargetInbox,
        *,
        topics: Topics | None = None,
        outbox: Outbox | None = None,
        credential: str | None = None,
    ) -> None:
        self._cfg = config
        self._inbox = inbox
        self.outbox = outbox
        self._topics = topics or Topics()
        self.connected = threading.Event()
        self.refused: str | None = None  # the broker's reason when it refused our login
        # Why the last connection attempt failed before MQTT (TLS, socket); None once connected.
        self.last_error: str | None = None
        self._answered = False  # the broker answered this connection's CONNECT (CONNACK)
        self._started = False
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=config.device_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.reconnect_delay_set(
            min_delay=max(1, int(config.mqtt_reconnect_min_s)),
            max_delay=max(1, int(config.mqtt_reconnect_max_s)),
        )
        tls = config.mqtt_tls_settings()
        if tls is not None:
            try:
                self._client.tls_set_context(tls.context())
            except MqttTlsError as exc:
                raise ConfigError(f"invalid agent config: {exc}") from exc
        if credential:
            self.set_credential(credential)
        self._client.max_queued_messages_set(1000)  # reports kept while offline
        # An exception in a callback must not end paho's network thread (paho logs it).
        self._client.suppress_exceptions = True
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def set_credential(self, credential: str) -> None:
        """Log in as username = device id, password = credential (used from the next connect)."""
        self._client.username_pw_set(self._cfg.device_id, credential)

    @property
    def target_topic(self) -> str:
        return self._topics.target(self._cfg.device_id)

    def start(self) -> None:
        """Connect in the background; paho's loop thread reconnects with backoff.

        Raises:
            TransportError: the connection could not even be attempted (bad host name).
        """
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._cfg.mqtt_session_expiry_s
        props.MaximumPacketSize = MAX_MQTT_PACKET_BYTES
        try:
            self._client.connect_async(
                self._cfg.mqtt_host,
                self._cfg.mqtt_port,
                keepalive=self._cfg.mqtt_keepalive_s,
                clean_start=self._cfg.mqtt_session_expiry_s == 0,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise TransportError(f"MQTT connect to {self._cfg.mqtt_host}: {exc}") from exc
        self._client.loop_start()
        self._started = True

    @property
    def loop_alive(self) -> bool | None:
        """Whether paho's network thread runs; None before ``start`` (or after ``stop``)."""
        thread = getattr(self._client, "_thread", None)  # paho keeps no public handle on it
        if not self._started:
            return None
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        """Disconnect cleanly (the broker keeps the session) and join paho's thread."""
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self._started = False
        self.connected.clear()

    # ---- paho callbacks: network thread, keep them trivial -----------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._answered = True
        if reason_code.is_failure:
            # Bad credentials or a revoked device: paho retries with its capped backoff.
            log.warning("MQTT connect refused: %s", reason_code)
            self.refused = str(reason_code)
            return
        self.refused = None
        self.last_error = None
        # Subscribe on every connect: cheap, and correct when the broker lost our session.
        client.subscribe(self.target_topic, qos=1)
        self.connected.set()
        log.info("MQTT connected (session present: %s)", getattr(flags, "session_present", None))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` around the connect attempt, so the
        # exception being handled is the reason (it passes none); a bad certificate is one.
        reason = describe_connect_failure(sys.exc_info()[1])
        if reason != self.last_error:  # once per distinct reason, not once per retry
            log.warning(
                "MQTT connect to %s:%s failed: %s", self._cfg.mqtt_host, self._cfg.mqtt_port, reason
            )
        self.last_error = reason

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.connected.clear()
        if not self._answered and reason_code != 0:
            # Closed before any CONNACK: a TLS broker that wants a client certificate does
            # this, after a handshake that looked fine from here.
            reason = describe_early_disconnect(reason_code, tls=self._cfg.mqtt_tls)
            if reason != self.last_error:
                log.warning(
                    "MQTT connect to %s:%s failed: %s",
                    self._cfg.mqtt_host,
                    self._cfg.mqtt_port,
                    reason,
                )
            self.last_error = reason
        elif reason_code != 0:
            log.warning("MQTT disconnected: %s", reason_code)
        self._answered = False

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.target_topic:
                self._inbox.put(Inbound.of("mqtt", msg.payload))
        except Exception:  # never on the network thread: the message is lost, the link is not
            log.exception("MQTT message on %r dropped", getattr(msg, "_topic", b"")[:200])

    # ---- publishing ----------------------------------------------------------------------------
    def publish_status(self, report: StatusReport) -> None:
        """QoS 1: queued by paho while offline and delivered on reconnect."""
        self._publish(self._topics.status(self._cfg.device_id), report.to_json(), qos=1)

    def publish_metrics(self, report: MetricsReport) -> None:
        """QoS 0: a lost window is replaced by the next one."""
        self._publish(self._topics.metrics(self._cfg.device_id), report.to_json(), qos=0)

    def publish_monitor(self, summary: MonitorSummary) -> None:
        """QoS 1: a lost period is a hole in the drift record; held in the outbox offline."""
        self._publish(self._topics.monitor(self._cfg.device_id), summary.to_json(), qos=1)

    def _publish(self, topic: str, payload: bytes, *, qos: int) -> None:
        """Publish now, or hold the report in the outbox while the broker is unreachable."""
        if self.outbox is not None and (not self.connected.is_set() or len(self.outbox)):
            self.outbox.add(topic, payload, qos)  # keeps order behind reports already held
            return
        if not self._send(topic, payload, qos) and self.outbox is not None:
            self.outbox.add(topic, payload, qos)

    def _send(self, topic: str, payload: bytes, qos: int) -> bool:
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            return True
        if info.rc != mqtt.MQTT_ERR_NO_CONN:
            log.warning("MQTT publish to %s failed: rc=%s", topic, info.rc)
        return False

    def drain_outbox(self) -> int:
        """Deliver held reports (QoS 1) while connected; called from an agent thread."""
        if self.outbox is None or not len(self.outbox) or not self.connected.is_set():
            return 0
        return self.outbox.drain(lambda t, p, q: self.connected.is_set() and self._send(t, p, q))
