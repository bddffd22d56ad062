"""What each device should run now, as a contract.TargetMessage.

Rule: a device of an active rollout that was released to (its wave started: ``notified_at`` is
set) gets the rollout's release, unless it is held out (quarantined) or rolled the release back
on probation; every other device gets the line's ``current_release``. Devices outside a started
wave are never told about the new version, whether they ask over HTTP or hear it over MQTT.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from contract import TargetMessage
from server import crud
from server.db import Device, ModelLine, Release, Rollout, RolloutDevice
from server.errors import NotFoundError
from server.rollout import ACTIVE_ROLLOUT_STATES

# Rollout devices that get the line's current release instead of the rollout's.
NOT_SENT_STATES = ("queued", "quarantined", "rolled_back")


def artifact_url(public_url: str, sha256: str) -> str:
    return f"{public_url.rstrip('/')}/api/v1/artifacts/{sha256}"


def message_for_release(
    release: Release, *, public_url: str, rollout_id: int | None
) -> TargetMessage:
    return TargetMessage(
        model_line=release.line,
        envelope=dict(release.envelope),
        artifact_url=artifact_url(public_url, release.sha256),
        rollout_id=rollout_id,
    )


def active_rollout(session: Session, *, line: str) -> Rollout | None:
    return session.scalar(
        select(Rollout)
        .where(Rollout.model_line == line, Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
        .order_by(Rollout.id.desc())
        .limit(1)
    )


def targets_for_line(
    session: Session, *, line: str, public_url: str, device_ids: list[str] | None = None
) -> list[tuple[str, TargetMessage]]:
    """The target of every device of ``line`` (or of ``device_ids`` among them)."""
    model_line = crud.get_model_line(session, name=line)
    stmt = select(Device.device_id).where(Device.model_line == line)
    if device_ids is not None:
        stmt = stmt.where(Device.device_id.in_(device_ids))
    devices = list(session.scalars(stmt).all())
    current = _current_message(session, model_line, public_url=public_url)
    rollout = active_rollout(session, line=line)
    in_rollout: set[str] = set()
    rollout_msg: TargetMessage | None = None
    if rollout is not None and rollout.release is not None:
        rollout_msg = message_for_release(
            crud.get_release(session, line=line, release=rollout.release),
            public_url=public_url,
            rollout_id=rollout.id,
        )
        in_rollout = set(
            session.scalars(
                select(RolloutDevice.device_id).where(
                    RolloutDevice.rollout_id == rollout.id,
                    RolloutDevice.notified_at.is_not(None),
                    RolloutDevice.state.not_in(NOT_SENT_STATES),
                )
            ).all()
        )
    out: list[tuple[str, TargetMessage]] = []
    for device_id in devices:
        if rollout_msg is not None and device_id in in_rollout:
            out.append((device_id, rollout_msg))
        elif current is not None:
            out.append((device_id, current))
    return out


def _current_message(session: Session, line: ModelLine, *, public_url: str) -> TargetMessage | None:
    if line.current_release is None:
        return None
    release = crud.get_release(session, line=line.name, release=line.current_release)
    return message_for_release(release, public_url=public_url, rollout_id=None)


def resolve_target(session: Session, *, device_id: str, public_url: str) -> TargetMessage:
    """The target of one device.

    Raises:
        NotFoundError: unknown device, or its line has no signed release yet.
    """
    device = crud.get_device(session, device_id=device_id)
    found = targets_for_line(
        session, line=device.model_line, public_url=public_url, device_ids=[device_id]
    )
    if not found:
        raise NotFoundError(
            f"model line {device.model_line!r} has no signed release yet: "
            "the first model is still being trained"
        )
    return found[0][1]
