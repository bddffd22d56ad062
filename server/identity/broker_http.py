"""Answers to a clustered broker's per-request questions: may this login connect, may it
publish or subscribe to this topic (``server.api.routes.broker`` serves them over HTTP).

Same credentials and same rules as the file path (``server.identity.broker_acl``): a device logs
in as username = device id with the credential it got at enrollment, checked against the
stored sha256 of that credential; the server's own login is ``Settings.mqtt_username`` /
``mqtt_password``; rights come from ``server.identity.broker_rules``. A revoked device is
refused at once (the next call after the revocation's commit), with no file to rewrite.

Cost per call: one primary-key lookup (``device_credentials`` by device id, joined to its
``devices`` row for the groups when a topic is checked); nothing for the server's own login.
A broker that caches answers (mosquitto-go-auth ``auth_opt_cache``, EMQX's authorization cache)
calls far less.
"""

from __future__ import annotations

import hmac

from sqlalchemy import select
from sqlalchemy.orm import Session

from contract.topics import valid_device_id
from server.db.fleet import Device
from server.db.identity import DeviceCredential
from server.identity.auth import MAX_TOKEN_CHARS, hash_token
from server.identity.broker_rules import Access, Rule, device_rules, permits, server_rules


def check_login(
    session: Session,
    *,
    username: str,
    password: str,
    clientid: str | None,
    server_user: str,
    server_password: str,
) -> bool:
    """Whether ``username``/``password`` may connect.

    The server's login needs its configured password (an empty one never matches). A device
    needs a live credential; when the broker sends the client id it must be the device id
    (the agent connects so), so one device cannot take over another's session.
    """
    if server_user and username == server_user:
        return bool(server_password) and hmac.compare_digest(
            password.encode(), server_password.encode()
        )
    if not valid_device_id(username) or not password or len(password) > MAX_TOKEN_CHARS:
        return False
    if clientid and clientid != username:
        return False
    row = session.execute(
        select(DeviceCredential.credential_hash, DeviceCredential.revoked_at).where(
            DeviceCredential.device_id == username
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return False
    return hmac.compare_digest(hash_token(password), row.credential_hash)


def rules_of(session: Session, username: str, *, server_user: str) -> tuple[Rule, ...]:
    """The rights of a login; none for an unknown or revoked device."""
    if server_user and username == server_user:
        return server_rules()
    if not valid_device_id(username):
        return ()
    row = session.execute(
        select(DeviceCredential.revoked_at, Device.groups)
        .join(Device, Device.device_id == DeviceCredential.device_id)
        .where(DeviceCredential.device_id == username)
    ).first()
    if row is None or row.revoked_at is not None:
        return ()
    return device_rules(username, tuple(row.groups or ()))


def check_access(
    session: Session, *, username: str, topic: str, access: Access, server_user: str
) -> bool:
    """Whether ``username`` may ``access`` ``topic`` (see ``broker_rules.permits``)."""
    return permits(rules_of(session, username, server_user=server_user), access, topic)
