"""Issuing and withdrawing identities: operator tokens, bootstrap tokens, device credentials.

Enrollment exchanges a bootstrap (enrollment) token for a per-device credential:

* the token is looked up by its sha256; unknown -> 401, expired or used up -> 401 naming why;
* it may pin the model line and the groups a device may claim (403 when the request asks for
  more);
* a device id that already holds a live credential is refused (409): a bootstrap token, even a
  multi-use one, cannot take over an enrolled device. The one exception is the same enrollment
  retried after its reply was lost: the request carries the secret the device sent with the
  first one (``enroll_secret``, stored hashed), and gets a new credential in place of the one it
  never received. A revoked device stays revoked (403); it
  comes back only under a new device id. (A device that lost its credential is revoked and
  re-enrolled under a new id: that is the audit trail we want.)

The plaintext credential is returned once; the database keeps its sha256 (HTTP) and its Mosquitto
``$7$`` hash (broker password file). Every change is recorded in the audit log
(``server.db.audit``).
Functions flush; the caller commits.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from contract.topics import valid_device_id
from server.core.errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from server.db import audit, fleet, registry
from server.db.fleet import Device
from server.db.identity import DeviceCredential, EnrollmentToken, OperatorToken
from server.identity.auth import Operator, Role, hash_token, mosquitto_hash, new_secret

log = logging.getLogger(__name__)

MAX_ENROLLMENT_USES = 1_000_000  # devices one bootstrap token may enroll


@dataclass(frozen=True)
class Issued:
    """A secret as issued: the plaintext (shown once) and the stored row's id."""

    id: int
    token: str


# ---------------------------------------------------------------- operator tokens


def create_operator_token(
    session: Session, *, name: str, role: Role, by: Operator, now: datetime
) -> Issued:
    """A new operator bearer token with ``role``; returns the plaintext once."""
    token = new_secret()
    row = OperatorToken(
        name=name, role=role.value, token_hash=hash_token(token), created_at=now, created_by=by.name
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=by.name,
        action="token.create",
        subject=f"operator:{name}",
        details={"token_id": row.id, "role": role.value},
        now=now,
    )
    return Issued(id=row.id, token=token)


def revoke_operator_token(session: Session, *, token_id: int, by: Operator, now: datetime) -> None:
    """Withdraw an operator token (401 from then on)."""
    row = session.get(OperatorToken, token_id)
    if row is None:
        raise NotFoundError(f"unknown operator token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now
        audit.record(
            session,
            actor=by.name,
            action="token.revoke",
            subject=f"operator:{row.name}",
            details={"token_id": row.id},
            now=now,
        )
    session.flush()


def list_operator_tokens(session: Session) -> list[OperatorToken]:
    return list(session.scalars(select(OperatorToken).order_by(OperatorToken.id)).all())


# ---------------------------------------------------------------- enrollment


def create_enrollment_token(
    session: Session,
    *,
    max_uses: int,
    ttl_s: float,
    model_line: str | None,
    groups: list[str],
    by: Operator,
    now: datetime,
) -> tuple[Issued, EnrollmentToken]:
    """A bootstrap token good for ``max_uses`` enrollments within ``ttl_s`` seconds."""
    if not 1 <= max_uses <= MAX_ENROLLMENT_USES:
        raise InvalidRequestError(f"max_uses must be 1..{MAX_ENROLLMENT_USES}")
    if model_line is not None:
        registry.get_model_line(session, name=model_line)
    token = new_secret()
    row = EnrollmentToken(
        token_hash=hash_token(token),
        max_uses=max_uses,
        uses=0,
        model_line=model_line,
        groups=sorted(set(groups)),
        expires_at=now + timedelta(seconds=ttl_s),
        created_at=now,
        created_by=by.name,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=by.name,
        action="token.create",
        subject=f"enrollment:{row.id}",
        details={"max_uses": max_uses, "model_line": model_line, "groups": row.groups},
        now=now,
    )
    return Issued(id=row.id, token=token), row


def ensure_enrollment_token(
    session: Session, *, token: str, max_uses: int, ttl_s: float, now: datetime
) -> bool:
    """Store ``token`` (its hash) as a bootstrap token unless it exists; True when created.

    For deployments that bake a fleet token into an image (Settings.enrollment_token)."""
    if session.scalar(
        select(EnrollmentToken.id).where(EnrollmentToken.token_hash == hash_token(token))
    ):
        return False
    session.add(
        EnrollmentToken(
            token_hash=hash_token(token),
            max_uses=max_uses,
            uses=0,
            model_line=None,
            groups=[],
            expires_at=now + timedelta(seconds=ttl_s),
            created_at=now,
            created_by="settings",
        )
    )
    session.flush()
    return True


def _live_token(session: Session, token: str, now: datetime) -> EnrollmentToken:
    """The unexpired bootstrap token ``token`` names (read, no lock taken)."""
    row = session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token))
    )
    if row is None:
        raise AuthenticationError("unknown enrollment token")
    if row.expires_at <= now:
        raise AuthenticationError(
            f"enrollment token {row.id} expired at {row.expires_at.isoformat()}"
        )
    return row


def _usable_token(session: Session, token: str, now: datetime) -> EnrollmentToken:
    """The bootstrap token ``token`` names, if it may still enroll (read, no lock taken)."""
    row = _live_token(session, token, now)
    if row.uses >= row.max_uses:
        raise _used_up(row)
    return row


def _used_up(row: EnrollmentToken) -> AuthenticationError:
    return AuthenticationError(
        f"enrollment token {row.id} is used up ({row.max_uses} of {row.max_uses} uses)"
    )


def _claim(session: Session, row: EnrollmentToken) -> None:
    """Count one use of the token (atomic guarded UPDATE; its row lock is held to commit)."""
    claimed = session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.id == row.id, EnrollmentToken.uses < EnrollmentToken.max_uses)
        .values(uses=EnrollmentToken.uses + 1)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not claimed:
        raise _used_up(row)


def check_allowed(
    *, device_id: str, model_line: str, groups: list[str], line: str | None, allowed: list[str]
) -> None:
    """Raise ForbiddenError when a device claims a line or groups its token did not grant."""
    if line is not None and model_line != line:
        raise ForbiddenError(
            f"device {device_id}'s enrollment allows model line {line!r}, not {model_line!r}"
        )
    extra = sorted(set(groups) - set(allowed)) if allowed else []
    if extra:
        raise ForbiddenError(
            f"device {device_id}'s enrollment allows groups {allowed}, not {extra}"
        )


@dataclass(frozen=True)
class Enrollment:
    device: Device
    credential: str  # plaintext, returned once


def enroll_device(
    session: Session,
    *,
    token: str,
    device_id: str,
    model_line: str,
    hardware: str | None,
    groups: list[str],
    agent_version: str | None,
    now: datetime,
    enroll_secret: str | None = None,
) -> Enrollment:
    """Exchange a bootstrap token for a device credential (see the module docstring).

    ``enroll_secret``: the device's secret for this enrollment. Stored hashed; a retry of an
    enrollment whose reply was lost, with the same bootstrap token and secret, gets a new
    credential in place of the first (see ``_retry``) instead of a ConflictError.

    Raises:
        AuthenticationError: unknown, expired or used-up token.
        ForbiddenError: revoked device, or a line/groups the token does not allow.
        ConflictError: the device is already enrolled (and this is no retry of that).
        InvalidRequestError / NotFoundError: bad device id, unknown line.
    """
    if not valid_device_id(device_id) or ":" in device_id:
        raise InvalidRequestError(
            "device_id must be 1-128 of [A-Za-z0-9._-] starting with a letter or digit "
            "(it is also the device's MQTT username, which cannot hold ':')"
        )
    existing = session.get(DeviceCredential, device_id)
    if existing is not None and existing.revoked_at is not None:
        raise ForbiddenError(f"device {device_id} is revoked; enroll it under a new device id")
    if existing is not None and _is_retry(existing, enroll_secret):
        return _retry(
            session,
            existing,
            token=token,
            model_line=model_line,
            hardware=hardware,
            groups=groups,
            agent_version=agent_version,
            now=now,
        )
    if existing is not None:
        raise ConflictError(
            f"device {device_id} is already enrolled; it keeps its credential "
            "(revoke it and enroll a new device id to replace it)"
        )
    row = _usable_token(session, token, now)
    granted = list(groups) if groups or not row.groups else list(row.groups)
    check_allowed(
        device_id=device_id,
        model_line=model_line,
        groups=granted,
        line=row.model_line,
        allowed=row.groups,
    )
    device = fleet.register_device(
        session,
        device_id=device_id,
        model_line=model_line,
        hardware=hardware,
        groups=granted,
        agent_version=agent_version,
        now=now,
        commit=False,
    )
    credential = new_secret()
    session.add(
        DeviceCredential(
            device_id=device_id,
            credential_hash=hash_token(credential),
            mqtt_hash=mosquitto_hash(credential),
            issued_at=now,
            enrollment_token_id=row.id,
            allowed_line=row.model_line,
            allowed_groups=list(row.groups),
            enroll_secret_hash=hash_token(enroll_secret) if enroll_secret else None,
        )
    )
    session.flush()
    # Only now the locks every enrollment contends for, held to the caller's commit: the audit
    # log's append lock (taken first, see server.db.audit: lock order) and the token's row. A fleet
    # enrolling at once serialises on these two, so nothing else happens while they are held.
    audit.lock(session)
    _claim(session, row)
    audit.record(
        session,
        actor=f"enrollment:{row.id}",
        action="device.enroll",
        subject=f"device:{device_id}",
        details={"model_line": model_line, "groups": granted, "enrollment_token": row.id},
        now=now,
    )
    return Enrollment(device=device, credential=credential)


def _is_retry(cred: DeviceCredential, enroll_secret: str | None) -> bool:
    """Does this request carry the secret the device's enrollment was made with?"""
    return bool(
        enroll_secret
        and cred.enroll_secret_hash
        and hmac.compare_digest(cred.enroll_secret_hash, hash_token(enroll_secret))
    )


def _retry(
    session: Session,
    cred: DeviceCredential,
    *,
    token: str,
    model_line: str,
    hardware: str | None,
    groups: list[str],
    agent_version: str | None,
    now: datetime,
) -> Enrollment:
    """The same enrollment again (its reply was lost): a new credential replaces the first,
    which nobody received. Only the requester of the first enrollment knows its secret, so a
    holder of the (multi-use) bootstrap token alone still cannot take over an enrolled device.
    The token must be the one that enrolled it and unexpired; no further use is counted.
    """
    row = _live_token(session, token, now)
    if row.id != cred.enrollment_token_id:
        raise ConflictError(f"device {cred.device_id} is already enrolled")
    granted = list(groups) if groups or not row.groups else list(row.groups)
    check_allowed(
        device_id=cred.device_id,
        model_line=model_line,
        groups=granted,
        line=row.model_line,
        allowed=row.groups,
    )
    device = fleet.register_device(
        session,
        device_id=cred.device_id,
        model_line=model_line,
        hardware=hardware,
        groups=granted,
        agent_version=agent_version,
        now=now,
        commit=False,
    )
    credential = new_secret()
    cred.credential_hash = hash_token(credential)
    cred.mqtt_hash = mosquitto_hash(credential)
    cred.issued_at = now
    session.flush()
    audit.lock(session)
    audit.record(
        session,
        actor=f"enrollment:{row.id}",
        action="device.enroll_retry",
        subject=f"device:{cred.device_id}",
        details={"model_line": model_line, "groups": granted, "enrollment_token": row.id},
        now=now,
    )
    return Enrollment(device=device, credential=credential)


def revoke_device(session: Session, *, device_id: str, by: Operator, now: datetime) -> Device:
    """Refuse the device everywhere from now on (HTTP 403; gone from the broker files)."""
    device = fleet.get_device(session, device_id=device_id)
    cred = session.get(DeviceCredential, device_id)
    if cred is None:
        # Never enrolled (registered before enrollment existed): a placeholder that no bearer
        # value can match, so the revocation is still recorded and enrollment stays refused.
        cred = DeviceCredential(
            device_id=device_id,
            credential_hash=f"revoked:{device_id}"[:64],
            mqtt_hash="!",
            issued_at=now,
        )
        session.add(cred)
    if cred.revoked_at is None:
        cred.revoked_at = now
        audit.record(
            session,
            actor=by.name,
            action="device.revoke",
            subject=f"device:{device_id}",
            details={},
            now=now,
        )
    session.flush()
    return device


def revoked_device_ids(session: Session) -> set[str]:
    """Every revoked device id (the MQTT bridge drops their queued reports)."""
    return set(
        session.scalars(
            select(DeviceCredential.device_id).where(DeviceCredential.revoked_at.is_not(None))
        ).all()
    )


def broker_users(session: Session) -> list[tuple[str, str, list[str]]]:
    """(device_id, mqtt_hash, groups) of every live enrolled device, by id."""
    rows = session.execute(
        select(DeviceCredential.device_id, DeviceCredential.mqtt_hash, Device.groups)
        .join(Device, Device.device_id == DeviceCredential.device_id)
        .where(DeviceCredential.revoked_at.is_(None))
        .order_by(DeviceCredential.device_id)
    ).all()
    return [(d, h, list(g or [])) for d, h, g in rows]
