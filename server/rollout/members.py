"""Who is in which wave, who gets released, retried, timed out or quarantined (DB side).

This module is the one writer of a member's state (``rollout_devices.state``): the engine's
transitions (queued, notified, timed out, retried, quarantined) and what devices report
(:func:`apply_reports`, called by the ingest writer in its batch), in the vocabulary of
``server.rollout.states`` (``contract.DeviceState`` plus the server's own states).

Every transition is a guarded UPDATE (``... WHERE state = <what we read>``) with ``RETURNING`` of
the rows it changed, so the caller publishes targets only to the devices it really moved: two
engines or a restarted one never double-release, and a device's history (``rollout_events``) holds
each transition once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Boolean, Table, and_, bindparam, case, func, insert, or_, select, update
from sqlalchemy.orm import Session

from contract import DeviceState, StatusReport
from server.db.fleet import Device
from server.db.rollouts import DeviceHealth, Rollout, RolloutDevice, RolloutEvent
from server.release.targeting import device_matches, targeting_of
from server.rollout.plan import Plan
from server.rollout.states import (
    FAILURE_STATES,
    IN_PROGRESS_STATES,
    RETRYABLE_STATES,
    SHADOW_STATE,
    SUCCESS_STATES,
    TERMINAL_STATES,
    ServerState,
)


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
            state = ServerState.QUARANTINED if d in held else ServerState.QUEUED
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
            rd.state == ServerState.QUARANTINED,
            rd.notified_at.is_(None),
            rd.device_id.not_in(list(held) or [""]),
        )
        .values(state=ServerState.QUEUED, updated_at=now, reason="quarantine over")
        .returning(rd.device_id, rd.stage)
    ).all()
    out_now = session.execute(
        update(rd)
        .where(
            rd.rollout_id == rollout.id,
            rd.state == ServerState.QUEUED,
            rd.device_id.in_(list(held)),
        )
        .values(state=ServerState.QUARANTINED, updated_at=now, reason="held out: quarantined")
        .returning(rd.device_id, rd.stage)
    ).all()
    log_events(
        session,
        rollout.id,
        ((d, w, ServerState.QUEUED, "quarantine over") for d, w in back),
        now=now,
    )
    log_events(
        session,
        rollout.id,
        ((d, w, ServerState.QUARANTINED, held[d]) for d, w in out_now),
        now=now,
    )
    if release_upto is None:
        return []
    released = session.execute(
        update(rd)
        .where(
            rd.rollout_id == rollout.id,
            rd.state == ServerState.QUEUED,
            rd.stage <= release_upto,
        )
        .values(state=DeviceState.NOTIFIED, notified_at=now, updated_at=now, reason="release sent")
        .returning(rd.device_id, rd.stage)
    ).all()
    log_events(
        session,
        rollout.id,
        ((d, w, DeviceState.NOTIFIED, "release sent") for d, w in released),
        now=now,
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
            .values(state=ServerState.TIMED_OUT, updated_at=now, reason=why)
            .returning(rd.stage)
        ).all()
        if res:
            done.append(d)
            log_events(session, rollout_id, [(d, res[0][0], ServerState.TIMED_OUT, why)], now=now)
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
        .values(
            state=DeviceState.NOTIFIED, attempts=rd.attempts + 1, updated_at=now, reason="retry"
        )
        .returning(rd.device_id, rd.stage, rd.attempts)
    ).all()
    log_events(
        session,
        rollout_id,
        ((d, w, DeviceState.NOTIFIED, f"retry {a} of {max_retries}") for d, w, a in rows),
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
                .values(state=ServerState.QUARANTINED, updated_at=now, reason=why)
            )
            log_events(
                session,
                rollout_id,
                [(r.device_id, r.stage, ServerState.QUARANTINED, why)],
                now=now,
            )
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


def apply_reports(
    session: Session, items: Iterable[tuple[StatusReport, datetime]], lines: Mapping[str, str]
) -> None:
    """Move members to the state their devices reported (the ingest writer's batch; flushes).

    Only reports about a rollout's release count (by ``rollout_id``, or by ``target_release`` on
    the device's registered line); the latest report per member wins. A member already counted
    a success moves only on a final report (success or failure), never back to in progress.

    Args:
        items: (status report, received at) pairs, any order.
        lines: device id -> its registered model line, for every device in ``items``.
    """
    statuses = [
        (r, t) for r, t in items if r.rollout_id is not None or r.target_release is not None
    ]
    if not statuses:
        return
    rollouts = session.execute(
        select(Rollout.id, Rollout.model_line, Rollout.release, Rollout.to_version).where(
            or_(
                Rollout.id.in_({r.rollout_id for r, _ in statuses if r.rollout_id}),
                Rollout.release.in_({r.target_release for r, _ in statuses if r.target_release}),
            )
        )
    ).all()
    by_id = {ro.id: ro for ro in rollouts}
    by_release = {(ro.model_line, ro.release): ro for ro in rollouts}
    latest: dict[tuple[int, str], tuple[StatusReport, datetime]] = {}
    for report, received_at in statuses:
        ro = by_id.get(report.rollout_id) if report.rollout_id is not None else None
        if ro is None:
            # The device's registered line: the report's may have been dropped.
            ro = by_release.get((lines[report.device_id], report.target_release))
        if ro is None or ro.release is None:
            continue
        if report.target_release is not None and report.target_release != ro.release:
            continue  # about another release (e.g. the rollback), not this rollout's
        if report.state in SUCCESS_STATES and report.model_version != ro.to_version:
            continue
        key = (ro.id, report.device_id)
        if key not in latest or report.ts >= latest[key][0].ts:
            latest[key] = (report, received_at)
    if not latest:
        return
    rd = cast(Table, RolloutDevice.__table__)
    stmt = (
        update(rd)
        .where(
            rd.c.rollout_id == bindparam("r_id"),
            rd.c.device_id == bindparam("d_id"),
            # Plain comparisons: an IN list cannot be expanded inside an executemany.
            or_(
                and_(*(rd.c.state != s for s in sorted(SUCCESS_STATES))),
                bindparam("terminal", type_=Boolean),
            ),
        )
        .values(
            state=bindparam("st"),
            updated_at=bindparam("now"),
            reason=bindparam("why"),
            installed_at=case(
                (
                    bindparam("ok", type_=Boolean),
                    func.coalesce(rd.c.installed_at, bindparam("now")),
                ),
                else_=rd.c.installed_at,
            ),
        )
    )
    session.execute(
        stmt,
        [
            {
                "r_id": rid,
                "d_id": did,
                "st": r.state,
                "now": t,
                "why": _clean(r.reason),
                "ok": r.state in SUCCESS_STATES or r.state == SHADOW_STATE,
                "terminal": r.state in TERMINAL_STATES,
            }
            # In key order: every writer (two servers' ingest, the engine) then locks the
            # rows it shares in the same order, so two batches cannot deadlock on them.
            for (rid, did), (r, t) in sorted(latest.items())
        ],
    )


def _clean(text: str | None) -> str | None:
    return text.replace("\x00", "") if text is not None else None
