"""Request and response bodies of the identity endpoints (server.api.routes.auth)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from server.api.schemas import DevicePublic, Name, OptText, Strict, Text
from server.identity.auth import Role
from server.identity.enrollment import MAX_ENROLLMENT_USES

Secret = Annotated[str, StringConstraints(min_length=1, max_length=512)]
# Long enough that it cannot be guessed (a device makes it with secrets.token_urlsafe(32)).
EnrollSecret = Annotated[str, StringConstraints(min_length=32, max_length=512)]
MAX_TOKEN_TTL_S = 366 * 86400.0  # seconds a bootstrap token may live at most


class OperatorMe(BaseModel):
    name: str
    role: Role


class OperatorTokenCreate(Strict):
    name: Text
    role: Role


class OperatorTokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


class OperatorTokenIssued(OperatorTokenPublic):
    token: str  # plaintext, shown once


class EnrollmentTokenCreate(Strict):
    max_uses: Annotated[int, Field(ge=1, le=MAX_ENROLLMENT_USES)] = 1
    ttl_s: Annotated[float, Field(gt=0, le=MAX_TOKEN_TTL_S)] | None = None  # seconds
    model_line: Name | None = None  # pin the line enrolled devices may join
    groups: Annotated[list[Name], Field(max_length=32)] = []  # groups they may claim


class EnrollmentTokenIssued(BaseModel):
    id: int
    token: str  # plaintext, shown once
    max_uses: int
    expires_at: datetime
    model_line: str | None
    groups: list[str]


class DeviceEnroll(Strict):
    bootstrap_token: Secret
    device_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    model_line: Name
    hardware: OptText | None = None
    groups: Annotated[list[Name], Field(max_length=32)] = []
    agent_version: OptText | None = None
    # A random secret the device makes once per enrollment and keeps until it has stored its
    # credential: a retry with the same one after a lost reply gets a new credential (the
    # first is withdrawn) instead of 409. None: a retry is refused as before.
    enroll_secret: EnrollSecret | None = None


class DeviceEnrolled(BaseModel):
    device_id: str
    credential: str  # plaintext, shown once: HTTP bearer token and MQTT password
    device: DevicePublic
