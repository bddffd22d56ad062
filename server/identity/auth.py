"""Who is calling: operator roles, device identities, and the hashing of their secrets.

Two kinds of caller hold bearer tokens (``Authorization: Bearer <token>``):

* operators, with a :class:`Role` (viewer < operator < approver < admin; a higher role has every
  right of a lower one). The bootstrap admin token comes from ``Settings.admin_token``; every
  other operator token is issued by an admin and stored as a sha256 hash;
* devices, with the per-device credential they got at enrollment (``server.identity.enrollment``).

The functions here are the pure core (hashing, role order) plus the two lookups the API's
dependencies call; nothing stores a plaintext secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.core.errors import AuthenticationError, ForbiddenError
from server.db.identity import DeviceCredential, OperatorToken

SECRET_BYTES = 32  # bytes of randomness in every issued token or credential
MAX_TOKEN_CHARS = 512  # characters; a longer bearer value is refused without hashing it
ADMIN_NAME = "admin"  # operator name of the bootstrap admin token

# Mosquitto 2's password-file hash (mosquitto_passwd): PBKDF2-HMAC-SHA512.
MOSQUITTO_ITERATIONS = 101
MOSQUITTO_SALT_BYTES = 12
MOSQUITTO_KEY_BYTES = 64


class Role(StrEnum):
    """Operator roles, lowest first; compare with :func:`has_role`."""

    viewer = "viewer"
    operator = "operator"
    approver = "approver"
    admin = "admin"


_RANK = {role: i for i, role in enumerate(Role)}


def has_role(role: Role, minimum: Role) -> bool:
    """Whether ``role`` has every right of ``minimum``."""
    return _RANK[role] >= _RANK[minimum]


@dataclass(frozen=True)
class Operator:
    """An authenticated operator (a person or a tool acting for one)."""

    name: str
    role: Role


@dataclass(frozen=True)
class DeviceIdentity:
    """An authenticated device: the only device id its requests may speak for."""

    device_id: str


def new_secret() -> str:
    """A fresh URL-safe random token (``SECRET_BYTES`` of entropy)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_token(token: str) -> str:
    """sha256 hex of a token: what the database keeps and looks up by."""
    return hashlib.sha256(token.encode()).hexdigest()


def mosquitto_hash(password: str, *, salt: bytes | None = None) -> str:
    """The ``$7$`` hash Mosquitto 2's ``password_file`` expects (as ``mosquitto_passwd`` writes)."""
    salt = salt if salt is not None else secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    key = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), salt, MOSQUITTO_ITERATIONS, MOSQUITTO_KEY_BYTES
    )
    b64 = base64.b64encode
    return f"$7${MOSQUITTO_ITERATIONS}${b64(salt).decode()}${b64(key).decode()}"


def check_mosquitto_hash(password: str, stored: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (used by tests and the CLI's self-check)."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt = base64.b64decode(parts[3])
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), MOSQUITTO_KEY_BYTES)
    return hmac.compare_digest(base64.b64encode(key).decode(), parts[4])


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises:
        AuthenticationError: no header, another scheme, or an empty/oversized token.
    """
    if not authorization:
        raise AuthenticationError("missing credentials: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthenticationError(f"token longer than {MAX_TOKEN_CHARS} characters")
    return token


def authenticate_operator(session: Session, token: str, *, admin_token: str) -> Operator:
    """The operator a bearer token belongs to.

    Raises:
        AuthenticationError: unknown or revoked token (also a device credential: devices are not
            operators).
    """
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Operator(name=ADMIN_NAME, role=Role.admin)
    row = session.scalar(select(OperatorToken).where(OperatorToken.token_hash == hash_token(token)))
    if row is None:
        raise AuthenticationError("unknown operator token")
    if row.revoked_at is not None:
        raise AuthenticationError(f"operator token {row.id} ({row.name}) was revoked")
    return Operator(name=row.name, role=Role(row.role))


def require_role(operator: Operator, minimum: Role, *, action: str = "this") -> Operator:
    """Raises ForbiddenError when ``operator`` is below ``minimum``; returns it otherwise."""
    if not has_role(operator.role, minimum):
        raise ForbiddenError(
            f"{operator.name} has role {operator.role.value}; {action} needs {minimum.value}"
        )
    return operator


def authenticate_device(session: Session, token: str) -> DeviceIdentity:
    """The device a bearer credential belongs to.

    Raises:
        AuthenticationError: unknown credential (or a superseded one after re-enrollment).
        ForbiddenError: the device was revoked.
    """
    row = session.scalar(
        select(DeviceCredential).where(DeviceCredential.credential_hash == hash_token(token))
    )
    if row is None:
        raise AuthenticationError("unknown device credential: enroll the device first")
    if row.revoked_at is not None:
        raise ForbiddenError(f"device {row.device_id} is revoked")
    return DeviceIdentity(device_id=row.device_id)


def require_same_device(identity: DeviceIdentity, device_id: str) -> None:
    """Raises ForbiddenError unless the request speaks for the authenticated device."""
    if device_id != identity.device_id:
        raise ForbiddenError(
            f"device {identity.device_id} cannot act as device {str(device_id)[:128]}"
        )
