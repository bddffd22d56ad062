"""Training triggers beside the sample threshold: the schedule and alerts; the discipline all
triggers share (cooldown, evidence floor).

Schedule: :func:`due_lines` is pure (the lines' clocks and ``now`` in, names out);
:func:`enqueue_due` is the shell the job runner calls before each claim. A line is due when
``schedule_s`` seconds passed since its last job was queued (or since it was created) and samples
were accepted since then (``new_samples > 0``: every enqueue resets that counter).

Alerts: :func:`retrain_for_alert` queues a job with trigger ``alert`` when a raised alert's rule
is one the line's config lists in ``retrain_on_alerts``, under the same discipline as the
threshold: one queued or running job per line, the line's cooldown after its last training, and
only for evidence against the version the fleet is moving to (:func:`evidence_floor`): an
alert on a version a rollout is replacing trains nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db import job_queue, registry
from server.db.registry import ModelLine
from server.db.rollouts import Rollout
from server.rollout.states import ACTIVE_ROLLOUT_STATES


@dataclass(frozen=True)
class LineClock:
    name: str
    schedule_s: float | None  # seconds
    last_job_at: datetime | None
    created_at: datetime
    new_samples: int


def due_lines(lines: Iterable[LineClock], now: datetime) -> list[str]:
    """Names of the lines whose schedule says train now."""
    out = []
    for line in lines:
        if not line.schedule_s or line.new_samples <= 0:
            continue
        since = line.last_job_at or line.created_at
        if (now - since).total_seconds() >= line.schedule_s:
            out.append(line.name)
    return sorted(out)


def enqueue_due(session: Session, *, now: datetime) -> list[int]:
    """Queue a ``schedule`` job for each due line that has none queued or running; commits."""
    clocks = [
        LineClock(r.name, r.schedule_s, r.last_job_at, r.created_at, r.new_samples)
        for r in session.execute(
            select(
                ModelLine.name,
                ModelLine.schedule_s,
                ModelLine.last_job_at,
                ModelLine.created_at,
                ModelLine.new_samples,
            ).where(ModelLine.schedule_s.is_not(None))
        )
    ]
    session.rollback()  # end the read; each line below is its own transaction
    queued: list[int] = []
    for name in due_lines(clocks, now):
        registry.lock_model_line(session, name=name)
        job = job_queue.add_job(session, line=name, trigger="schedule", now=now)
        session.commit()
        if job is not None:
            queued.append(job.id)
    return queued


def evidence_floor(session: Session, *, lines: set[str]) -> dict[str, int]:
    """Per line, the oldest model version whose samples count toward the next training.

    That is the version the fleet is moving to: the newest of the champion and any candidate
    in approval or rollout. A device still on an older version keeps uploading what that
    version gets wrong; those samples are stored and used in datasets, but they are evidence
    against a model being replaced, not against the candidate, so they trigger nothing.
    """
    if not lines:
        return {}
    floors = {
        name: champion or 0
        for name, champion in session.execute(
            select(ModelLine.name, ModelLine.champion_version).where(ModelLine.name.in_(lines))
        )
    }
    for name, newest in session.execute(
        select(Rollout.model_line, func.max(Rollout.to_version))
        .where(Rollout.model_line.in_(lines), Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
        .group_by(Rollout.model_line)
    ):
        floors[name] = max(floors.get(name, 0), int(newest))
    return floors


def cooldown_of(training_config: Mapping[str, Any] | None, default_s: float) -> float:
    """The line's retraining cooldown in seconds (its config's ``cooldown_s``, else the
    server default)."""
    value = (training_config or {}).get("cooldown_s")
    return float(value) if isinstance(value, int | float) and value >= 0 else default_s


@dataclass(frozen=True)
class AlertRetrain:
    """What a raised alert did to training: the job it queued, or why it queued none."""

    job_id: int | None
    note: str | None  # None when a job was queued, or when the rule trains nothing


def retrain_for_alert(
    session: Session,
    *,
    line: str,
    rule: str,
    alert_id: int,
    model_version: int,
    now: datetime,
    default_cooldown_s: float = 0.0,
) -> AlertRetrain:
    """Queue a training of ``line`` for a raised alert if its config asks for it; flushes only
    (the caller's transaction records the alert and the job together).

    Within the line's cooldown after its last training the job is queued to start when the
    cooldown ends. No job when a job is already queued or running, or when the alert is about
    a version older than the one the fleet is moving to.
    """
    ml = registry.lock_model_line(session, name=line)
    wanted = (ml.training_config or {}).get("retrain_on_alerts") or []
    if rule not in wanted:
        return AlertRetrain(None, None)
    floor = evidence_floor(session, lines={line}).get(line, 0)
    if model_version < floor:
        return AlertRetrain(
            None, f"v{model_version} is being replaced by v{floor}: no training for its alert"
        )
    not_before = None
    cooldown_s = cooldown_of(ml.training_config, default_cooldown_s)
    if cooldown_s > 0:
        last = job_queue.last_job_finished_at(session, line=line)
        if last is not None and (now - last).total_seconds() < cooldown_s:
            not_before = last + timedelta(seconds=cooldown_s)
    job = job_queue.add_job(
        session, line=line, trigger="alert", now=now, not_before=not_before, alert_id=alert_id
    )
    if job is None:
        active = job_queue.active_job(session, line=line)
        what = f"training job {active.id} is already {active.status}" if active else "a job"
        return AlertRetrain(None, f"{what}; no second training queued")
    return AlertRetrain(job.id, None)


__all__ = [
    "AlertRetrain",
    "LineClock",
    "cooldown_of",
    "due_lines",
    "enqueue_due",
    "evidence_floor",
    "retrain_for_alert",
]
