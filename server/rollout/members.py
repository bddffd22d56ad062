"""Who is in which wave, who gets released, retried, timed out or quarantined (DB side).

Every change is a guarded UPDATE (``... WHERE state = <what we read>``) with ``RETURNING`` of the
rows it changed, so the caller publishes targets only to the devices it really moved: two engines
or a restarted one never double-release, and a device's history (``rollout_events``) holds each
transition once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from server.db.fleet import Device
from server.db.rollouts import DeviceHealth, Rollout, RolloutDevice, RolloutEvent
from server.release.targeting import device_matches, targeting_of
from server.rollout.decide import FAILURE_STATES, IN_PROGRESS_STATES, RETRYABLE_STATES
from server.rollout.plan import Plan


def log_events(
    session: Session,
    rollout_id: int,
    events: Iterable[tuple[str | None, int | None, str, str | None]],
    *,
    now: datetime,
    by: str | None = None,
) -> None:
    """Append (device_id, wave, state, reason) events of one rollout."""
    rows = [
        {
            "rollout_id": rollout_id,
            "device_id": d,
            "wave": w,
            "state": s,
            "reason": r,
            "by": by,
            "at": now,
        }
        for d, w, s, r in events
    ]
    if rows:
        session.execute(insert(RolloutEvent), rows)


def quarantined_now(
    session: Session, device_ids: Iterable[str] | None, now: datetime
) -> dict[str, str]:
    """Device id -> reason, for the devices held out at ``now`` (of ``device_ids``; None: all).

    The held-out set is small, so it is read whole and filtered here rather than sent to the
    database as a list of every device of the fleet."""
    rows = session.execute(
        select(DeviceHealth.device_id, DeviceHealth.reason).where(
            DeviceHealth.quarantined_until > now
        )
    ).all()
    held = {r.device_id: r.reason or "quarantined" for r in rows}
    if device_ids is None:
        return held
    ids = set(device_ids)
    return {d: why for d, why in held.items() if d in ids}


def _admitted(rollout: Rollout, rows: Iterable[Any]) -> dict[str, list[str]]:
    targeting = targeting_of(rollout.targeting)
    return {
        d: list(g or ())
        for d, hw, g in rows
        if device_matches(targeting, device_id=d, hardware=hw, groups=g or ())
    }


def audience(session: Session, rollout: Rollout) -> dict[str, list[str]]:
    """Device id -> groups, for the devices of the rollout's line its targeting admits
    (server.release.targeting): the only devices that become members and get its release."""
    return _admitted(
        rollout,
        session.execute(
            select(Device.device_id, Device.hardware, Device.groups).where(
                Device.model_line == rollout.model_line
            )
        ).tuples(),
    )


def newcomers(session: Session, rollout: Rollout) -> dict[str, list[str]]:
    """The audience's devices that are not members yet (an anti-join: a tick reads only the
    devices that joined since the last one, not the whole fleet)."""
    rd = RolloutDevice
    member = select(rd.device_id).where(
        rd.rollout_id == rollout.id, rd.device_id == Device.device_id
    )
    return _admitted(
        rollout,
        session.execute(
            select(Device.device_id, Device.hardware, Device.groups).where(
                Device.model_line == rollout.model_line, ~member.exists()
            )
        ).tuples(),
    )


def sync_members(
    session: Session, rollout: Rollout, plan: Plan, *, now: datetime, release_upto: int | None
) -> list[str]:
    """Place new devices of the audience in their wave, hold out or let back quarantined ones,
    and release the queued devices of waves ``<= release_upto``. Returns the devices released
    now.

    Every step is a set operation in the database (new members by anti-join, the held-out set
    from ``device_health``), so a tick costs the same for 100 or 10,000 members when nothing
    changed."""
    rd = RolloutDevice
    new_devices = newcomers(session, rollout)
    held = quarantined_now(session, None, now)
    new = sorted(new_devices)
    if new:
        rows: list[dict[str, Any]] = []
        events: list[tuple[str | None, int | None, str, str | None]] = []
        for d in new:
            wave = plan.wave_of(rollout.id, d, new_devices[d])
            state = "quarantined" if d in held else "queued"
            why = held.get(d) or f"in wave {wave + 1} ({plan.waves[wave].label})"
            rows.append(
                {
                    "rollout_id": rollout.id,
                    "device_id": d,
                    "stage": wave,
                    "state": state,
                    "updated_at": now,
                    "reason": why,
                    "attempts": 0,
                    "failures": 0,
                }
            )
            events.append((d, wave, state, why))
        session.execute(insert(rd), rows)
        log_events(session, rollout.id, events, now=now)
    # Held out before their wave: back in the queue once the penalty is over; and vice versa.
    back = session.execute(
        update(rd)
        .where(
            rd.rollout_id == rollout.id,
            rd.state == "quarantined",
            rd.notified_at.is_(None),
            rd.device_id.not_in(list(held) or [""]),
        )
        .values(state="queued", updated_at=now, reason="quarantine over")
        .returning(rd.device_id, rd.stage)
    ).all()
    out_now = session.execute(
        update(rd)
        .where(rd.rollout_id == rollout.id, rd.state == "queued", rd.device_id.in_(list(held)))
        .values(state="quarantined", updated_at=now, reason="held out: quarantined")
        .returning(rd.device_id, rd.stage)
    ).all()
    log_events(session, rollout.id, ((d, w, "queued", "quarantine over") for d, w in back), now=now)
    log_events(session, rollout.id, ((d, w, "quarantined", held[d]) for d, w in out_now), now=now)
    if release_upto is None:
        return []
    released = session.execute(
        update(rd)
        .where(rd.rollout_id == rollout.id, rd.state == "queued", rd.stage <= release_upto)
        .values(state="notified", notified_at=now, updated_at=now, reason="release sent")
        .returning(rd.device_id, rd.stage)
    ).all()
    log_events(
        session, rollout.id, ((d, w, "notified", "release sent") for d, w in released), now=now
    )
    return sorted(d for d, _ in released)


def mark_timed_out(
    session: Session,
    rollout_id: int,
    devices: Mapping[str, tuple[str, float]],
    *,
    now: datetime,
) -> list[str]:
    """devices: id -> (state read, timeout s). Guarded on the state read."""
    done: list[str] = []
    rd = RolloutDevice
    for d, (state, timeout_s) in sorted(devices.items()):
        if state not in IN_PROGRESS_STATES:
            continue
        why = f"no progress for {timeout_s:g} s (stuck in {state})"
        res = session.execute(
            update(rd)
            .where(rd.rollout_id == rollout_id, rd.device_id == d, rd.state == state)
            .values(state="timed_out", updated_at=now, reason=why)
            .returning(rd.stage)
        ).all()
        if res:
            done.append(d)
            log_events(session, rollout_id, [(d, res[0][0], "timed_out", why)], now=now)
    return done


def retry(
    session: Session, rollout_id: int, devices: Iterable[str], *, max_retries: int, now: datetime
) -> list[str]:
    """Send the release again to failed / timed-out devices that have retries left."""
    rd = RolloutDevice
    ids = list(devices)
    if not ids:
        return []
    rows = session.execute(
        update(rd)
        .where(
            rd.rollout_id == rollout_id,
            rd.device_id.in_(ids),
            rd.state.in_(RETRYABLE_STATES),
            rd.attempts < max_retries,
        )
        .values(state="notified", attempts=rd.attempts + 1, updated_at=now, reason="retry")
        .returning(rd.device_id, rd.stage, rd.attempts)
    ).all()
    log_events(
        session,
        rollout_id,
        ((d, w, "notified", f"retry {a} of {max_retries}") for d, w, a in rows),
        now=now,
    )
    return sorted(d for d, _, _ in rows)


def count_failures(
    session: Session,
    rollout_id: int,
    *,
    threshold: int,
    penalty_s: float,
    now: datetime,
) -> list[str]:
    """Count each failed attempt once per device (across rollouts, in ``device_health``); a
    device reaching ``threshold`` failures is quarantined for ``penalty_s``. Returns the devices
    quarantined now."""
    rd = RolloutDevice
    rows = session.execute(
        select(rd.device_id, rd.stage, rd.failures, rd.reason, rd.state).where(
            rd.rollout_id == rollout_id,
            rd.state.in_(FAILURE_STATES),
            rd.failures <= rd.attempts,
        )
    ).all()
    quarantined: list[str] = []
    for r in rows:
        claimed = session.execute(
            update(rd)
            .where(
                rd.rollout_id == rollout_id, rd.device_id == r.device_id, rd.failures == r.failures
            )
            .values(failures=r.failures + 1)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue  # another engine counted it
        health = session.get(DeviceHealth, r.device_id, with_for_update=True)
        if health is None:
            health = DeviceHealth(device_id=r.device_id, failures=0, updated_at=now)
            session.add(health)
        health.failures = (health.failures or 0) + 1
        health.updated_at = now
        if health.failures >= threshold:
            why = (
                f"quarantined for {penalty_s:g} s after {health.failures} failed attempts; "
                f"last: {r.state}: {r.reason or 'no reason given'}"
            )
            health.failures = 0
            health.quarantined_until = now + timedelta(seconds=penalty_s)
            health.reason = why
            session.execute(
                update(rd)
                .where(rd.rollout_id == rollout_id, rd.device_id == r.device_id)
                .values(state="quarantined", updated_at=now, reason=why)
            )
            log_events(session, rollout_id, [(r.device_id, r.stage, "quarantined", why)], now=now)
            quarantined.append(r.device_id)
        session.flush()
    return quarantined


def touch_in_progress(session: Session, rollout_id: int, now: datetime) -> None:
    """Restart the per-device timeouts (after a pause)."""
    session.execute(
        update(RolloutDevice)
        .where(
            RolloutDevice.rollout_id == rollout_id,
            RolloutDevice.state.in_(IN_PROGRESS_STATES),
        )
        .values(updated_at=now)
    )


def released_devices(session: Session, rollout_id: int) -> list[str]:
    """Devices of the rollout that were sent its release (any wave started so far)."""
    return list(
        session.scalars(
            select(RolloutDevice.device_id).where(
                RolloutDevice.rollout_id == rollout_id, RolloutDevice.notified_at.is_not(None)
            )
        ).all()
    )
