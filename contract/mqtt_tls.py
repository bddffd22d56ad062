"""MQTT over TLS: the one way the agent, the server and the simulators build their TLS context.

Both ends of the broker link read the same settings (names as in ``AgentConfig`` and the
server's ``Settings``):

- ``mqtt_tls``: connect over TLS (the broker's TLS listener, usually port 8883);
- ``mqtt_ca_file``: PEM file of the CAs trusted for the broker's certificate (unset: the
  system's trust store);
- ``mqtt_client_cert`` / ``mqtt_client_key``: a client certificate (and its key, unless the
  certificate file holds it) for brokers that require one (Mosquitto ``require_certificate``);
- ``mqtt_tls_insecure``: skip the check that the certificate names the host connected to. The
  chain is still verified against the CA. Development only: refused in production;
- ``mqtt_allow_plaintext``: production refuses plain MQTT unless this is set (a broker on the
  same host or a private network, say).

:class:`MqttTls` builds the ``ssl.SSLContext`` (TLS 1.2 or later, certificate required, host
name checked). :func:`tls_problems` is the pure check of the combination. Errors here are
``MqttTlsError`` (a ``ValueError``: a setting is wrong, retrying cannot help); each side
translates it into its own ``ConfigError`` at its boundary. This module is no part of the wire
format; it lives in ``contract`` because both ends need it and ``contract`` is the one package
both import.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class MqttTlsError(ValueError):
    """The MQTT TLS settings are unusable (a missing or unreadable file, a bad combination)."""


@dataclass(frozen=True)
class MqttTls:
    """What a client needs to open a verified TLS connection to the broker."""

    ca_file: Path | None = None  # None: the system's trusted CAs
    cert_file: Path | None = None  # client certificate (PEM), optional
    key_file: Path | None = None  # its private key (PEM); None: inside cert_file
    check_hostname: bool = True  # False only with the development-only insecure switch

    def context(self) -> ssl.SSLContext:
        """A client context: the broker's chain verified against ``ca_file``, its name checked.

        Raises:
            MqttTlsError: a file is missing or unreadable, or holds no usable certificate/key.
        """
        if self.key_file is not None and self.cert_file is None:
            raise MqttTlsError("mqtt_client_key is set without mqtt_client_cert")
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(self.ca_file) if self.ca_file is not None else None,
            )
        except FileNotFoundError as exc:
            raise MqttTlsError(f"mqtt_ca_file {self.ca_file}: no such file") from exc
        except (OSError, ssl.SSLError) as exc:
            raise MqttTlsError(
                f"mqtt_ca_file {self.ca_file}: not a readable PEM CA bundle ({_reason(exc)})"
            ) from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            try:
                ctx.load_cert_chain(
                    str(self.cert_file),
                    str(self.key_file) if self.key_file is not None else None,
                    password=_no_password,
                )
            except FileNotFoundError as exc:
                raise MqttTlsError(
                    f"mqtt_client_cert/mqtt_client_key: no such file: {exc.filename}"
                ) from exc
            except (OSError, ssl.SSLError) as exc:
                raise MqttTlsError(
                    f"mqtt_client_cert {self.cert_file}"
                    + (f" / mqtt_client_key {self.key_file}" if self.key_file else "")
                    + f": not a readable PEM certificate and matching key ({_reason(exc)})"
                ) from exc
        ctx.check_hostname = self.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _no_password() -> bytes:
    """An encrypted key cannot be unlocked at start (no one to type a passphrase): refused."""
    raise MqttTlsError("the key is encrypted; give an unencrypted key file (mode 0600)")


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


def tls_problems(
    *,
    environment: str,
    tls: bool,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    insecure: bool,
    allow_plaintext: bool,
) -> list[str]:
    """Every reason the combination of MQTT TLS settings is refused (empty: acceptable)."""
    problems = []
    production = environment == "production"
    if not tls:
        given = [
            name
            for name, value in (
                ("mqtt_ca_file", ca_file),
                ("mqtt_client_cert", cert_file),
                ("mqtt_client_key", key_file),
            )
            if value is not None
        ]
        if insecure:
            given.append("mqtt_tls_insecure")
        if given:
            problems.append(f"{', '.join(given)} set but mqtt_tls is off: set mqtt_tls too")
        if production and not allow_plaintext:
            problems.append(
                "production refuses plain MQTT: set mqtt_tls (and mqtt_ca_file), or "
                "mqtt_allow_plaintext when the broker link is private"
            )
    if key_file is not None and cert_file is None:
        problems.append("mqtt_client_key is set without mqtt_client_cert")
    if production and insecure:
        problems.append("mqtt_tls_insecure (no host name check) is for development only")
    return problems


def describe_connect_failure(exc: BaseException | None) -> str:
    """A sentence for an operator from the exception a connection attempt raised."""
    if exc is None:
        return "connection failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            "TLS: the broker's certificate was refused (certificate verify failed: "
            f"{exc.verify_message or exc})"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {_reason(exc)}"
    return f"{type(exc).__name__}: {exc}"


def describe_early_disconnect(reason: object, *, tls: bool) -> str:
    """A sentence for a connection the broker closed before answering our CONNECT."""
    hint = (
        " (over TLS: the broker may require a client certificate, or refuse the one sent)"
        if tls
        else ""
    )
    return f"the broker closed the connection before accepting it: {reason}{hint}"
