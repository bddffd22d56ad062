"""Database side of rollouts: creating one, and the snapshot ``decide`` judges.

Pure decision logic lives in ``server.rollout``; transitions in ``server.rollout_engine``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from server import crud
from server.core.config import Settings
from server.db import DeviceMetric, Rollout, RolloutDevice
from server.errors import ConflictError
from server.rollout import SUCCESS_STATES, MetricSummary, StageSnapshot, Thresholds
from server.targets import active_rollout

_SUMS = (
    func.sum(DeviceMetric.inferences),
    func.sum(DeviceMetric.errors),
    func.sum(DeviceMetric.labelled),
    func.sum(DeviceMetric.correct),
    func.sum(DeviceMetric.p95 * DeviceMetric.inferences),
)


def thresholds_from(settings: Settings) -> Thresholds:
    return Thresholds(
        min_labelled=settings.min_labelled,
        max_accuracy_drop=settings.max_accuracy_drop,
        max_error_rate=settings.max_error_rate,
        max_latency_ratio=settings.max_latency_ratio,
        latency_slack_ms=settings.latency_slack_ms,
        canary_min_soak_s=settings.canary_min_soak_s,
        install_timeout_s=settings.install_timeout_s,
        max_failed_ratio=settings.max_failed_ratio,
    )


def create_rollout(
    session: Session,
    *,
    line: str,
    to_version: int,
    canary_percent: int,
    created_by: str,
    now: datetime,
) -> Rollout:
    """Add a rollout in ``pending_approval`` under the line's row lock; flushes only.

    Raises:
        NotFoundError: unknown line or version.
        ConflictError: the line has an active rollout or no champion, or the version is
            rejected, retired or already the champion.
    """
    model_line = crud.lock_model_line(session, name=line)
    version = crud.get_version(session, line=line, version=to_version)
    if version.status in ("rejected", "retired"):
        raise ConflictError(f"version {to_version} of {line!r} is {version.status}")
    if model_line.champion_version is None:
        raise ConflictError(f"model line {line!r} has no champion to roll out from")
    if model_line.champion_version == to_version:
        raise ConflictError(f"version {to_version} is already the champion of {line!r}")
    existing = active_rollout(session, line=line)
    if existing is not None:
        raise ConflictError(
            f"model line {line!r} already has rollout {existing.id} in state {existing.state}"
        )
    rollout = Rollout(
        model_line=line,
        from_version=model_line.champion_version,
        to_version=to_version,
        state="pending_approval",
        stage=0,
        canary_percent=canary_percent,
        created_by=created_by,
        created_at=now,
    )
    session.add(rollout)
    session.flush()
    return rollout


def build_snapshot(
    session: Session, rollout: Rollout, *, stage: int, now: datetime
) -> StageSnapshot:
    rows = session.execute(
        select(RolloutDevice.device_id, RolloutDevice.state, RolloutDevice.installed_at).where(
            RolloutDevice.rollout_id == rollout.id, RolloutDevice.stage == stage
        )
    ).all()
    states = {r.device_id: r.state for r in rows}
    installs = [r.installed_at for r in rows if r.installed_at and r.state in SUCCESS_STATES]
    started = rollout.stage_started_at or rollout.approved_at or now
    snap = StageSnapshot(
        stage=stage,
        now=now.timestamp(),
        stage_started_at=started.timestamp(),
        device_states=states,
        last_installed_at=max(installs).timestamp() if installs else None,
    )
    if stage == 1:
        return snap
    canary_ids = list(states)
    rd = RolloutDevice
    canary = summarize(
        session,
        select(*_SUMS)
        .join(
            rd,
            and_(
                rd.device_id == DeviceMetric.device_id,
                rd.rollout_id == rollout.id,
                rd.stage == 0,
            ),
        )
        .where(
            DeviceMetric.model_line == rollout.model_line,
            DeviceMetric.model_version == rollout.to_version,
            rd.installed_at.is_not(None),
            DeviceMetric.received_at >= rd.installed_at,
            DeviceMetric.received_at <= now,
        ),
    )
    period_start = min(installs) if installs else started
    control = summarize(
        session,
        select(*_SUMS).where(
            DeviceMetric.model_line == rollout.model_line,
            DeviceMetric.model_version == rollout.from_version,
            DeviceMetric.device_id.not_in(canary_ids),
            DeviceMetric.received_at >= period_start,
            DeviceMetric.received_at <= now,
        ),
    )
    baseline = summarize(
        session,
        select(*_SUMS).where(
            DeviceMetric.model_line == rollout.model_line,
            DeviceMetric.model_version == rollout.from_version,
            DeviceMetric.device_id.in_(canary_ids),
            DeviceMetric.received_at < (rollout.approved_at or started),
        ),
    )
    return StageSnapshot(
        stage=0,
        now=snap.now,
        stage_started_at=snap.stage_started_at,
        device_states=states,
        last_installed_at=snap.last_installed_at,
        canary=canary,
        control=control,
        baseline=baseline,
    )


def summarize(session: Session, stmt: Any) -> MetricSummary:
    row = session.execute(stmt).one()
    inferences = int(row[0] or 0)
    return MetricSummary(
        inferences=inferences,
        errors=int(row[1] or 0),
        labelled=int(row[2] or 0),
        correct=int(row[3] or 0),
        p95_ms=(float(row[4]) / inferences) if inferences and row[4] is not None else None,
    )


# ------------------------------------------------------------ thread
