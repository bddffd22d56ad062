"""The device's identity: enroll once with a bootstrap token, then keep the issued credential.

``credential.json`` in the state dir holds ``{"device_id", "credential"}``, written atomically
(temp file + fsync + ``os.replace``) with mode 0600. The same secret is the HTTP bearer token
(``Authorization: Bearer``) and the MQTT password (username = device id). The bootstrap token is
used once; after that only the credential is sent.

An enrollment carries a random secret of the device's (``enrollment.json``, written like the
credential before the request and removed once the credential is stored): when the reply is
lost, the retry sends the same secret and the server issues a new credential instead of
refusing the device as already enrolled.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from device_agent.config import AgentConfig
from device_agent.errors import IdentityError, TransportError
from device_agent.http import HttpClient

log = logging.getLogger(__name__)

CREDENTIAL_FILE = "credential.json"
ENROLLMENT_FILE = "enrollment.json"  # this enrollment's secret, until the credential is stored
ENROLL_PATH = "/api/v1/devices/enroll"
FILE_MODE = 0o600


def credential_path(state_dir: Path) -> Path:
    return Path(state_dir) / CREDENTIAL_FILE


def load_credential(config: AgentConfig) -> str | None:
    """The stored credential for this device id, or None (none yet, or for another id)."""
    path = credential_path(config.state_dir)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("unreadable %s (%s): enroll again with a bootstrap token", path, exc)
        return None
    if not isinstance(data, dict) or data.get("device_id") != config.device_id:
        log.error("%s belongs to another device id; ignoring it", path)
        return None
    cred = data.get("credential")
    return cred if isinstance(cred, str) and cred else None


def save_credential(config: AgentConfig, credential: str) -> None:
    """Persist the credential (0600, atomic) before it is used anywhere."""
    body = json.dumps({"device_id": config.device_id, "credential": credential}).encode()
    _write_private(credential_path(config.state_dir), body)


def enrollment_secret(config: AgentConfig) -> str:
    """This device's secret for its enrollment: the stored one (a retry), else a new one,
    persisted before it is sent."""
    path = Path(config.state_dir) / ENROLLMENT_FILE
    try:
        data = json.loads(path.read_bytes())
        if isinstance(data, dict) and data.get("device_id") == config.device_id:
            secret = data.get("secret")
            if isinstance(secret, str) and len(secret) >= 32:
                return secret
    except (OSError, ValueError):
        pass
    secret = secrets.token_urlsafe(32)
    _write_private(path, json.dumps({"device_id": config.device_id, "secret": secret}).encode())
    return secret


def _write_private(path: Path, body: bytes) -> None:
    """Write ``body`` to ``path`` atomically, mode 0600, fsynced with its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def enroll(config: AgentConfig, http: HttpClient) -> str:
    """Exchange ``config.bootstrap_token`` for a credential, persist it, return it.

    Raises:
        IdentityError: no bootstrap token, or the server refused it (4xx, with its reason).
        TransportError: the server could not be reached or answered 5xx (retry later).
    """
    if not config.bootstrap_token:
        raise IdentityError(
            f"device {config.device_id} has no credential and no bootstrap_token to enroll with"
        )
    body = {
        "bootstrap_token": config.bootstrap_token,
        "device_id": config.device_id,
        "model_line": config.model_line,
        "hardware": config.hardware,
        "groups": list(config.groups),
        "agent_version": config.agent_version,
        "enroll_secret": enrollment_secret(config),
    }
    resp = http.post(config.server_url + ENROLL_PATH, json=body)
    if resp.status_code == 201:
        try:
            credential = str(resp.json()["credential"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"enroll: unreadable reply: {exc}") from exc
        save_credential(config, credential)
        (Path(config.state_dir) / ENROLLMENT_FILE).unlink(missing_ok=True)
        log.info("enrolled as %s", config.device_id)
        return credential
    if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
        try:
            detail = str(resp.json().get("detail", resp.text))
        except (ValueError, AttributeError):
            detail = resp.text
        raise IdentityError(f"enrollment refused: HTTP {resp.status_code} {detail[:300]}")
    raise TransportError(f"enroll: HTTP {resp.status_code}")
