"""Dependency aliases for route handlers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from server.services import Services

MAX_INT32 = 2**31 - 1


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

# Integer path parameters are bounded so an absurd id is a 422, never a database overflow.
IdPath = Annotated[int, Path(ge=1, le=MAX_INT32)]
VersionPath = Annotated[int, Path(ge=0, le=MAX_INT32)]
