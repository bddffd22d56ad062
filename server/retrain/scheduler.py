"""The schedule trigger: a line with ``schedule_s`` trains that often, if new samples arrived.

:func:`due_lines` is pure (the lines' clocks and ``now`` in, names out); :func:`enqueue_due` is
the shell the job runner calls before each claim. A line is due when ``schedule_s`` seconds passed
since its last job was queued (or since it was created) and samples were accepted since then
(``new_samples > 0``: every enqueue resets that counter).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db import job_queue, registry
from server.db.registry import ModelLine


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


__all__ = ["LineClock", "due_lines", "enqueue_due"]
