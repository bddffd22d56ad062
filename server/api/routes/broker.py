"""The HTTP auth/ACL endpoint that clustered brokers call instead of reading our files.

Two formats, one rule set (``server.identity.broker_http``, ``server.identity.broker_rules``):

EMQX 5 (HTTP authenticator and HTTP authorizer; ``deploy/emqx/``):

- ``POST /api/v1/broker/emqx/authn`` ``{"username", "password", "clientid"}`` ->
  ``{"result": "allow" | "deny", "is_superuser": false}``;
- ``POST /api/v1/broker/emqx/authz`` ``{"username", "clientid", "topic", "action"}`` with action
  ``publish`` or ``subscribe`` -> ``{"result": "allow" | "deny"}``.

An unknown login is ``deny``, not ``ignore``: no later authenticator in the chain gets to
admit it. Nobody is a superuser; the server's login gets its rights from the rules.

mosquitto-go-auth's HTTP backend (``auth_opt_http_params_mode json``, response mode ``status`` or
``json``): 200 allows, 403 denies, and the body is ``{"ok": bool, "error": str}``:

- ``POST /api/v1/broker/goauth/user`` ``{"username", "password", "clientid"}``;
- ``POST /api/v1/broker/goauth/superuser`` ``{"username"}``: always 403 (no superusers);
- ``POST /api/v1/broker/goauth/acl`` ``{"username", "clientid", "topic", "acc"}`` with acc
  1 read (a delivery), 2 write (publish), 3 read and write, 4 subscribe.

Every call must carry ``Settings.broker_auth_secret``: ``Authorization: Bearer <secret>`` (EMQX
sends it as a configured header) or HTTP basic auth with the secret as password (go-auth has no
header option; put ``user:secret@`` in front of its ``auth_opt_http_host``). Without the secret:
401. With no secret configured: open in development, 403 for everyone in production.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.api.deps import ServicesDep, read_sessions
from server.core.errors import AuthenticationError, ForbiddenError
from server.identity.broker_http import check_access, check_login
from server.identity.broker_rules import MAX_TOPIC_BYTES, Access
from server.services import Services

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/broker", tags=["broker"])

MAX_NAME_CHARS = 256  # characters of a username or client id we look at
MAX_PASSWORD_CHARS = 1024  # characters of a password


def require_broker(request: Request, services: ServicesDep) -> Services:
    """Admit the broker that holds ``broker_auth_secret`` (see the module docstring)."""
    settings = services.settings
    secret = settings.broker_auth_secret
    if not secret:
        if settings.environment == "production":
            raise ForbiddenError(
                "the broker auth endpoint is off: set EDGELOOP_BROKER_AUTH_SECRET on the server "
                "and give it to the broker"
            )
        return services
    header = request.headers.get("authorization", "")
    scheme, _, value = header.strip().partition(" ")
    offered = ""
    if scheme.lower() == "bearer":
        offered = value.strip()
    elif scheme.lower() == "basic":
        try:
            offered = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            offered = ""
    if not offered or not hmac.compare_digest(offered.encode(), secret.encode()):
        raise AuthenticationError(
            "broker auth endpoint: send the broker secret as 'Authorization: Bearer <secret>' "
            "or as the password of HTTP basic auth"
        )
    return services


BrokerDep = Annotated[Services, Depends(require_broker)]


class LoginQuery(BaseModel):
    username: str = Field(default="", max_length=MAX_NAME_CHARS)
    password: str = Field(default="", max_length=MAX_PASSWORD_CHARS)
    clientid: str = Field(default="", max_length=MAX_NAME_CHARS)


class EmqxAccessQuery(BaseModel):
    username: str = Field(default="", max_length=MAX_NAME_CHARS)
    clientid: str = Field(default="", max_length=MAX_NAME_CHARS)
    topic: str = Field(default="", max_length=MAX_TOPIC_BYTES)
    action: Literal["publish", "subscribe"]


class GoAuthUserQuery(BaseModel):
    username: str = Field(default="", max_length=MAX_NAME_CHARS)


class GoAuthAclQuery(BaseModel):
    username: str = Field(default="", max_length=MAX_NAME_CHARS)
    clientid: str = Field(default="", max_length=MAX_NAME_CHARS)
    topic: str = Field(default="", max_length=MAX_TOPIC_BYTES)
    acc: int = Field(ge=0, le=255)


# mosquitto-go-auth's access codes (MOSQ_ACL_READ, _WRITE, both, _SUBSCRIBE).
GOAUTH_ACCESS = {1: Access.read, 2: Access.write, 3: Access.readwrite, 4: Access.read}
EMQX_ACCESS = {"publish": Access.write, "subscribe": Access.read}


def _login(services: Services, query: LoginQuery) -> bool:
    settings = services.settings
    with read_sessions(services)() as session:
        return check_login(
            session,
            username=query.username,
            password=query.password,
            clientid=query.clientid or None,
            server_user=settings.mqtt_username,
            server_password=settings.mqtt_password,
        )


def _access(services: Services, username: str, topic: str, access: Access) -> bool:
    with read_sessions(services)() as session:
        return check_access(
            session,
            username=username,
            topic=topic,
            access=access,
            server_user=services.settings.mqtt_username,
        )


def _emqx(allowed: bool, **extra: Any) -> dict[str, Any]:
    return {"result": "allow" if allowed else "deny", **extra}


def _goauth(allowed: bool, refusal: str) -> JSONResponse:
    return JSONResponse(
        {"ok": allowed, "error": "" if allowed else refusal}, status_code=200 if allowed else 403
    )


@router.post("/emqx/authn")
def emqx_authn(query: LoginQuery, services: BrokerDep) -> dict[str, Any]:
    """EMQX HTTP authenticator: may this login connect?"""
    return _emqx(_login(services, query), is_superuser=False)


@router.post("/emqx/authz")
def emqx_authz(query: EmqxAccessQuery, services: BrokerDep) -> dict[str, Any]:
    """EMQX HTTP authorizer: may this login publish to / subscribe to this topic?"""
    return _emqx(_access(services, query.username, query.topic, EMQX_ACCESS[query.action]))


@router.post("/goauth/user")
def goauth_user(query: LoginQuery, services: BrokerDep) -> JSONResponse:
    """mosquitto-go-auth ``http_getuser_uri``."""
    return _goauth(_login(services, query), "unknown login or wrong password")


@router.post("/goauth/superuser")
def goauth_superuser(query: GoAuthUserQuery, services: BrokerDep) -> JSONResponse:
    """mosquitto-go-auth ``http_superuser_uri``: nobody is; every right comes from the ACL."""
    return _goauth(False, "no superusers: rights come from the ACL")


@router.post("/goauth/acl")
def goauth_acl(query: GoAuthAclQuery, services: BrokerDep) -> JSONResponse:
    """mosquitto-go-auth ``http_aclcheck_uri``."""
    access = GOAUTH_ACCESS.get(query.acc)
    if access is None:
        return _goauth(False, f"unknown access code {query.acc}")
    return _goauth(_access(services, query.username, query.topic, access), "not allowed")
