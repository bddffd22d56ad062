"""ORM tables of identities: operator tokens, enrollment (bootstrap) tokens, device credentials.

Only hashes are stored: sha256 of a token for HTTP bearer lookups, and Mosquitto's PBKDF2-SHA512
form of a device credential for the broker's password file. A plaintext secret is returned once,
when it is issued, and never again.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from server.db.base import Base, BigId, UTCDateTime, utcnow


class OperatorToken(Base):
    __tablename__ = "operator_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    max_uses: Mapped[int] = mapped_column(Integer, default=1)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    model_line: Mapped[str | None] = mapped_column(String(64))  # None: any line
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)  # added to the device's groups
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class DeviceCredential(Base):
    """The one live credential of a device (re-enrollment replaces it)."""

    __tablename__ = "device_credentials"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), primary_key=True)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    mqtt_hash: Mapped[str] = mapped_column(String(256))  # $7$101$<salt>$<hash>
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enrollment_token_id: Mapped[int | None] = mapped_column(BigId)
    # What the enrollment token allowed, kept so a later /register cannot widen it.
    allowed_line: Mapped[str | None] = mapped_column(String(64))  # None: any line
    allowed_groups: Mapped[list[str]] = mapped_column(JSON, default=list)  # []: any groups
    # sha256 of the secret the device sent with its enrollment (None: it sent none): a retry
    # of that enrollment after a lost reply proves itself with it (server.identity.enrollment).
    enroll_secret_hash: Mapped[str | None] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
