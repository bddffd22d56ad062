"""What each device should run now, as a contract.TargetMessage.

Rule: a device of an active rollout that was released to (its wave started: ``notified_at`` is
set) gets the rollout's release, unless it is held out (quarantined) or rolled the release back
on probation; every other device gets the line's ``current_release``. Devices outside a started
wave are never told about the new version, whether they ask over HTTP or hear it over MQTT.

A release signed for part of the fleet (its targeting names devices, groups or hardware classes,
see server.release.targeting) is never sent to a device it does not admit: when the line's
current release is such a release (a targeted rollout completed), a device outside it gets the
newest serve release of the line that admits it, the one it already runs; none: no target.

Every target also carries ``roots``: the root metadata newer than version 1 (``Signer.roots``),
so a device provisioned with root v1 learns rotations and revocations with its next target.
Targets leave through a :class:`TargetPublisher` (the MQTT bridge of ``server.fleet`` is one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from contract import DeviceState, TargetMessage
from contract.manifest import Targeting
from server.core.errors import NotFoundError
from server.db import fleet, registry
from server.db.fleet import Device
from server.db.registry import ModelLine, Release
from server.db.rollouts import Rollout, RolloutDevice
from server.release.targeting import device_matches, narrows_devices, signed_targeting
from server.rollout.states import ACTIVE_ROLLOUT_STATES, ServerState


class TargetPublisher(Protocol):
    """Where the API and the rollout engine hand targets; never blocks on the network."""

    def publish(self, device_id: str, message: TargetMessage) -> None: ...


# Rollout devices that get the line's current release instead of the rollout's.
NOT_SENT_STATES = (ServerState.QUEUED, ServerState.QUARANTINED, DeviceState.ROLLED_BACK)


def artifact_url(artifact_base: str, sha256: str) -> str:
    """Where a device downloads artifact ``sha256``: ``Settings.artifact_url_base``/<sha256>
    (this server's route, a CDN or the bucket; the bytes are checked against the signed hash)."""
    return f"{artifact_base.rstrip('/')}/{sha256}"


Roots = Sequence[dict[str, Any]]


def message_for_release(
    release: Release, *, artifact_base: str, rollout_id: int | None, roots: Roots = ()
) -> TargetMessage:
    return TargetMessage(
        model_line=release.line,
        envelope=dict(release.envelope),
        artifact_url=artifact_url(artifact_base, release.sha256),
        rollout_id=rollout_id,
        roots=tuple(dict(r) for r in roots),
    )


def active_rollout(session: Session, *, line: str) -> Rollout | None:
    return session.scalar(
        select(Rollout)
        .where(Rollout.model_line == line, Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
        .order_by(Rollout.id.desc())
        .limit(1)
    )


def targets_for_line(
    session: Session,
    *,
    line: str,
    artifact_base: str,
    device_ids: list[str] | None = None,
    roots: Roots = (),
) -> list[tuple[str, TargetMessage]]:
    """The target of every device of ``line`` (or of ``device_ids`` among them)."""
    model_line = registry.get_model_line(session, name=line)
    stmt = select(Device.device_id, Device.hardware, Device.groups).where(Device.model_line == line)
    if device_ids is not None:
        stmt = stmt.where(Device.device_id.in_(device_ids))
    rows = session.execute(stmt).tuples().all()
    devices = [d for d, _, _ in rows]
    current = _current_message(session, model_line, artifact_base=artifact_base, roots=roots)
    outside = _fallbacks(session, model_line, rows, artifact_base=artifact_base, roots=roots)
    rollout = active_rollout(session, line=line)
    in_rollout: set[str] = set()
    rollout_msg: TargetMessage | None = None
    if rollout is not None and rollout.release is not None:
        rollout_msg = message_for_release(
            registry.get_release(session, line=line, release=rollout.release),
            artifact_base=artifact_base,
            rollout_id=rollout.id,
            roots=roots,
        )
        sent = select(RolloutDevice.device_id).where(
            RolloutDevice.rollout_id == rollout.id,
            RolloutDevice.notified_at.is_not(None),
            RolloutDevice.state.not_in(NOT_SENT_STATES),
        )
        if device_ids is not None:  # one device asking: not every member of the rollout
            sent = sent.where(RolloutDevice.device_id.in_(device_ids))
        in_rollout = set(session.scalars(sent).all())
    out: list[tuple[str, TargetMessage]] = []
    for device_id in devices:
        if rollout_msg is not None and device_id in in_rollout:
            out.append((device_id, rollout_msg))
        elif device_id in outside:
            fallback = outside[device_id]
            if fallback is not None:
                out.append((device_id, fallback))
        elif current is not None:
            out.append((device_id, current))
    return out


def devices_not_sent(session: Session, *, line: str, rollout_id: int) -> list[str]:
    """The devices of ``line`` that rollout ``rollout_id`` did not send its release to (not
    members, never released, held out or rolled back): whose target changes when it ends."""
    sent = select(RolloutDevice.device_id).where(
        RolloutDevice.rollout_id == rollout_id,
        RolloutDevice.device_id == Device.device_id,
        RolloutDevice.notified_at.is_not(None),
        RolloutDevice.state.not_in(NOT_SENT_STATES),
    )
    return list(
        session.scalars(
            select(Device.device_id)
            .where(Device.model_line == line, ~sent.exists())
            .order_by(Device.device_id)
        ).all()
    )


def _admits(targeting: Targeting, facts: tuple[str, str | None, tuple[str, ...]]) -> bool:
    device_id, hardware, groups = facts
    return device_matches(targeting, device_id=device_id, hardware=hardware, groups=groups)


def _fallbacks(
    session: Session,
    line: ModelLine,
    devices: Sequence[tuple[str, str | None, list[str] | None]],
    *,
    artifact_base: str,
    roots: Roots = (),
) -> dict[str, TargetMessage | None]:
    """For the devices the line's current release does not admit: the newest serve release of
    the line that does (None: no release admits it). Empty when the current release is for
    every device, the usual case, which reads nothing more."""
    if line.current_release is None:
        return {}
    current = registry.get_release(session, line=line.name, release=line.current_release)
    targeting, _ = signed_targeting(current.envelope)
    if not narrows_devices(targeting):
        return {}
    out: dict[str, TargetMessage | None] = {}
    older: list[tuple[Release, Targeting]] | None = None
    for device_id, hardware, groups in devices:
        facts = (device_id, hardware, tuple(groups or ()))
        if _admits(targeting, facts):
            continue
        if older is None:  # read once, newest first, only when a device needs it
            older = []
            for rel in session.scalars(
                select(Release)
                .where(Release.line == line.name, Release.release < line.current_release)
                .order_by(Release.release.desc())
            ).all():
                rel_targeting, deployment = signed_targeting(rel.envelope)
                if deployment == "serve":
                    older.append((rel, rel_targeting))
        found = next((rel for rel, tg in older if _admits(tg, facts)), None)
        out[device_id] = (
            message_for_release(found, artifact_base=artifact_base, rollout_id=None, roots=roots)
            if found is not None
            else None
        )
    return out


def _current_message(
    session: Session, line: ModelLine, *, artifact_base: str, roots: Roots = ()
) -> TargetMessage | None:
    if line.current_release is None:
        return None
    release = registry.get_release(session, line=line.name, release=line.current_release)
    return message_for_release(release, artifact_base=artifact_base, rollout_id=None, roots=roots)


def resolve_target(
    session: Session, *, device_id: str, artifact_base: str, roots: Roots = ()
) -> TargetMessage:
    """The target of one device.

    Raises:
        NotFoundError: unknown device, or its line has no signed release yet.
    """
    device = fleet.get_device(session, device_id=device_id)
    found = targets_for_line(
        session,
        line=device.model_line,
        artifact_base=artifact_base,
        device_ids=[device_id],
        roots=roots,
    )
    if not found:
        raise NotFoundError(
            f"model line {device.model_line!r} has no signed release yet: "
            "the first model is still being trained"
        )
    return found[0][1]
