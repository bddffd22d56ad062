"""The MQTT bridge's TLS context from the server's settings (``contract.mqtt_tls``).

Refusals are ``ConfigError``: the server does not start (``edgeloop-server`` exits 2) when the
broker link would be plain MQTT in production without ``mqtt_allow_plaintext``, when the insecure
switch is set in production, or when a CA, certificate or key file is missing or unreadable.
"""

from __future__ import annotations

import ssl

from contract.mqtt_tls import MqttTls, MqttTlsError, tls_problems
from server.core.config import Settings
from server.core.errors import ConfigError


def bridge_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The context the bridge connects with; None: plain MQTT (allowed by the settings).

    Raises:
        ConfigError: every problem with the MQTT TLS settings, in one message.
    """
    problems = tls_problems(
        environment=settings.environment,
        tls=settings.mqtt_tls,
        ca_file=settings.mqtt_ca_file,
        cert_file=settings.mqtt_client_cert,
        key_file=settings.mqtt_client_key,
        insecure=settings.mqtt_tls_insecure,
        allow_plaintext=settings.mqtt_allow_plaintext,
    )
    if problems:
        raise ConfigError("MQTT settings refused: " + "; ".join(problems))
    if not settings.mqtt_tls:
        return None
    tls = MqttTls(
        ca_file=settings.mqtt_ca_file,
        cert_file=settings.mqtt_client_cert,
        key_file=settings.mqtt_client_key,
        check_hostname=not settings.mqtt_tls_insecure,
    )
    try:
        return tls.context()
    except MqttTlsError as exc:
        raise ConfigError(f"MQTT settings refused: {exc}") from exc
