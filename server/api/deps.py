"""Dependency aliases for route handlers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session, sessionmaker

from server.identity.auth import (
    DeviceIdentity,
    Operator,
    Role,
    authenticate_device,
    authenticate_operator,
    bearer_token,
    require_role,
)
from server.services import Services

MAX_INT32 = 2**31 - 1


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def read_sessions(services: Services) -> sessionmaker[Session]:
    return services.read_sessions or services.sessions


def get_session(request: Request, services: ServicesDep) -> Iterator[Session]:
    """The request's session: a read session for GET/HEAD (no write lock on SQLite), else a
    writer's. Scope "function" (below): it closes when the handler returns, before the response
    is sent, so no connection or lock is held while a response (an artifact) streams."""
    maker = read_sessions(services) if request.method in READ_METHODS else services.sessions
    with maker() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

# Integer path parameters are bounded so an absurd id is a 422, never a database overflow.
IdPath = Annotated[int, Path(ge=1, le=MAX_INT32)]
VersionPath = Annotated[int, Path(ge=0, le=MAX_INT32)]


# --- Identity: operators (roles) and devices; see server.identity.auth. ---


def _authorization(request: Request) -> str | None:
    return request.headers.get("authorization")


def current_operator(request: Request, services: ServicesDep) -> Operator:
    """The operator behind the bearer token (401 without or with an unknown token)."""
    token = bearer_token(_authorization(request))
    with read_sessions(services)() as session:
        return authenticate_operator(
            session, token, admin_token=services.settings.effective_admin_token
        )


def _need(minimum: Role) -> Callable[..., Operator]:
    def dependency(operator: Annotated[Operator, Depends(current_operator)]) -> Operator:
        return require_role(operator, minimum, action="this request")

    dependency.__name__ = f"require_{minimum.value}"
    return dependency


require_viewer = _need(Role.viewer)
require_operator = _need(Role.operator)
require_approver = _need(Role.approver)
require_admin = _need(Role.admin)

ViewerDep = Annotated[Operator, Depends(require_viewer)]
OperatorDep = Annotated[Operator, Depends(require_operator)]
ApproverDep = Annotated[Operator, Depends(require_approver)]
AdminDep = Annotated[Operator, Depends(require_admin)]


def current_device(request: Request, services: ServicesDep) -> DeviceIdentity:
    """The device behind the bearer credential (401 unknown, 403 revoked)."""
    token = bearer_token(_authorization(request))
    with read_sessions(services)() as session:
        return authenticate_device(session, token)


DeviceDep = Annotated[DeviceIdentity, Depends(current_device)]
