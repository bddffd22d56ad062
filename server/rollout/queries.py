"""Database side of rollouts: creating one, settings -> policies, and the snapshot ``decide``
judges.

Pure decision logic lives in ``server.rollout.decide``; transitions in ``server.rollout.engine``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.core.errors import ConflictError, InvalidRequestError
from server.db import registry
from server.db.fleet import DeviceMetric
from server.db.quality import ClassMetric, ShadowMetric
from server.db.registry import ModelLine
from server.db.rollouts import Rollout, RolloutDevice, RolloutWave
from server.rollout.decide import DeviceRow, Retries, WaveSnapshot
from server.rollout.gates import ClassCounts, GateBounds, MetricSummary, ShadowSummary
from server.rollout.plan import Abort, Plan, PlanError, Wave, parse_plan_setting, shorthand
from server.rollout.targets import active_rollout

log = logging.getLogger(__name__)

_SUMS = (
    func.sum(DeviceMetric.inferences),
    func.sum(DeviceMetric.errors),
    func.sum(DeviceMetric.labelled),
    func.sum(DeviceMetric.correct),
    func.sum(DeviceMetric.p95 * DeviceMetric.inferences),
)


def bounds_from(settings: Settings) -> GateBounds:
    return GateBounds(
        min_labelled=settings.min_labelled,
        max_accuracy_drop=settings.max_accuracy_drop,
        accuracy_z=settings.accuracy_z,
        max_error_rate=settings.max_error_rate,
        max_latency_ratio=settings.max_latency_ratio,
        latency_slack_ms=settings.latency_slack_ms,
        min_class_support=settings.gate_min_class_support,
        max_class_recall_drop=settings.max_class_recall_drop,
    )


def retries_from(settings: Settings) -> Retries:
    return Retries(
        max_retries=settings.rollout_max_retries, backoff_s=settings.rollout_retry_backoff_s
    )


def wave_defaults(settings: Settings) -> Wave:
    """Per-wave fields a plan leaves out come from these settings."""
    return Wave(
        success_pct=settings.wave_success_pct,
        error_pct=settings.max_failed_ratio * 100,
        abort=Abort(failure_pct=settings.abort_failure_pct, min_devices=settings.abort_min_devices),
        min_soak_s=settings.wave_min_soak_s,
        timeout_s=settings.install_timeout_s,
    )


def _with_canary_soak(
    waves: Sequence[Wave], settings: Settings, given: set[int]
) -> tuple[Wave, ...]:
    """The first wave soaks ``canary_min_soak_s`` unless the plan said otherwise."""
    out = list(waves)
    if out and 0 not in given:
        out[0] = replace(out[0], min_soak_s=max(out[0].min_soak_s, settings.canary_min_soak_s))
    return tuple(out)


def default_plan(settings: Settings, canary_percent: int | None = None) -> Plan:
    """The settings' plan (``rollout_plan``), or ``canary_percent`` then 100."""
    defaults = wave_defaults(settings)
    if canary_percent is None:
        try:
            waves = parse_plan_setting(settings.rollout_plan, defaults)
        except PlanError as exc:
            raise InvalidRequestError(f"setting rollout_plan: {exc}") from exc
        if waves is not None:
            return Plan(_with_canary_soak(waves, settings, set()))
    return Plan(
        _with_canary_soak(
            shorthand(canary_percent or settings.canary_percent, defaults), settings, set()
        )
    )


def plan_from_request(
    settings: Settings, *, canary_percent: int | None, waves: list[dict[str, Any]] | None
) -> Plan:
    """The plan of a new rollout. Raises InvalidRequestError (422)."""
    if waves is None:
        return default_plan(settings, canary_percent)
    if canary_percent is not None:
        raise InvalidRequestError("give either canary_percent or waves, not both")
    defaults = wave_defaults(settings)
    try:
        parsed = tuple(
            Wave.from_dict({k: v for k, v in w.items() if v is not None}, defaults) for w in waves
        )
        soak_given = {i for i, w in enumerate(waves) if w.get("min_soak_s") is not None}
        return Plan(_with_canary_soak(parsed, settings, soak_given))
    except PlanError as exc:
        raise InvalidRequestError(f"invalid plan: {exc}") from exc


def create_rollout(
    session: Session,
    *,
    line: str,
    to_version: int,
    canary_percent: int,
    created_by: str,
    now: datetime,
    plan: Plan | None = None,
    targeting: dict[str, Any] | None = None,
) -> Rollout:
    """Add a rollout in ``pending_approval`` under the line's row lock; flushes only.

    Without ``plan`` the engine picks the settings' default plan at approval. ``targeting``
    (server.release.targeting) narrows who the rollout is for; None: every device of the line.

    Raises:
        NotFoundError: unknown line or version.
        ConflictError: the line has an active rollout or no champion, or the version is
            rejected, retired or already the champion.
    """
    model_line = registry.lock_model_line(session, name=line)
    version = registry.get_version(session, line=line, version=to_version)
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
    first = plan.waves[0].percent if plan is not None else None
    rollout = Rollout(
        model_line=line,
        from_version=model_line.champion_version,
        to_version=to_version,
        state="pending_approval",
        stage=0,
        canary_percent=round(first) if first is not None else canary_percent,
        created_by=created_by,
        created_at=now,
        plan=plan.to_dict() if plan is not None else None,
        targeting=targeting,
    )
    session.add(rollout)
    if to_version > model_line.champion_version:
        # The fleet now moves to ``to_version``: samples of older versions stop being evidence
        # for the next training (server.retrain.scheduler.evidence_floor), so the count restarts.
        model_line.new_samples = 0
    session.flush()
    return rollout


def auto_rollout(
    session: Session,
    *,
    line: str,
    to_version: int,
    canary_percent: int,
    created_by: str,
    now: datetime,
) -> Rollout | None:
    """Propose a rollout of a new candidate, pending approval, in a savepoint; flushes only.

    Returns None (and logs why) when the line cannot take one now: an active rollout, no
    champion, a version already rolled out.
    """
    try:
        with session.begin_nested():
            return create_rollout(
                session,
                line=line,
                to_version=to_version,
                canary_percent=canary_percent,
                created_by=created_by,
                now=now,
            )
    except ConflictError as exc:
        log.warning("no automatic rollout for %s v%s: %s", line, to_version, exc)
        return None


def plan_of(rollout: Rollout, settings: Settings) -> Plan:
    """The rollout's stored plan, or the default one it will get at approval."""
    if rollout.plan:
        return Plan.from_dict(rollout.plan)
    return default_plan(settings, None if settings.rollout_plan else rollout.canary_percent)


def build_snapshot(
    session: Session, rollout: Rollout, plan: Plan, *, now: datetime
) -> WaveSnapshot:
    """The running wave's devices and the new/old version's metrics since approval."""
    wave = rollout.stage
    rd = RolloutDevice
    rows = session.execute(
        select(
            rd.device_id, rd.state, rd.updated_at, rd.attempts, rd.installed_at, rd.notified_at
        ).where(rd.rollout_id == rollout.id, rd.stage == wave)
    ).all()
    devices = {
        r.device_id: DeviceRow(
            state=r.state,
            updated_at=r.updated_at.timestamp(),
            attempts=r.attempts or 0,
            installed_at=r.installed_at.timestamp() if r.installed_at else None,
            released=r.notified_at is not None,
        )
        for r in rows
    }
    wave_row = session.get(RolloutWave, (rollout.id, wave), populate_existing=True)
    started = (
        wave_row.started_at if wave_row else rollout.stage_started_at or rollout.approved_at or now
    )
    approved = rollout.approved_at or started
    released = select(rd.device_id).where(rd.rollout_id == rollout.id, rd.notified_at.is_not(None))
    line = rollout.model_line
    new = summarize(
        session,
        line=line,
        version=rollout.to_version,
        since=approved,
        until=now,
        devices=released,
    )
    control = summarize(session, line=line, version=rollout.from_version, since=approved, until=now)
    baseline = summarize(
        session, line=line, version=rollout.from_version, before=approved, devices=released
    )
    model_line = session.get(ModelLine, line)
    shadow = (
        shadow_summary(session, line=line, challenger=rollout.to_version, since=approved, until=now)
        if plan.waves[wave].kind == "shadow"
        else None
    )
    return WaveSnapshot(
        wave=wave,
        last_wave=plan.last,
        spec=plan.waves[wave],
        now=now.timestamp(),
        started_at=started.timestamp(),
        devices=devices,
        new=new,
        control=control,
        baseline=baseline,
        error_override=bool(wave_row and wave_row.error_override),
        class_names=tuple(model_line.labels or ()) if model_line else (),
        shadow=shadow,
    )


def summarize(
    session: Session,
    *,
    line: str,
    version: int | None,
    since: datetime | None = None,
    until: datetime | None = None,
    before: datetime | None = None,
    devices: Any = None,
) -> MetricSummary:
    """Sums of ``version``'s metric windows (and its served per-class counts) received in
    [since, until] or before ``before``, optionally only from ``devices`` (a subquery)."""

    def where(model: Any) -> list[Any]:
        conds = [model.model_line == line, model.model_version == version]
        if since is not None:
            conds.append(model.received_at >= since)
        if until is not None:
            conds.append(model.received_at <= until)
        if before is not None:
            conds.append(model.received_at < before)
        if devices is not None:
            conds.append(model.device_id.in_(devices))
        return conds

    row = session.execute(select(*_SUMS).where(*where(DeviceMetric))).one()
    inferences = int(row[0] or 0)
    classes = _class_sums(session, *where(ClassMetric), ClassMetric.source == "served")
    return MetricSummary(
        inferences=inferences,
        errors=int(row[1] or 0),
        labelled=int(row[2] or 0),
        correct=int(row[3] or 0),
        p95_ms=(float(row[4]) / inferences) if inferences and row[4] is not None else None,
        classes=classes,
    )


def _class_sums(session: Session, *conds: Any) -> ClassCounts:
    """label -> (support, correct, predicted), summed over the matching class_metrics rows."""
    cm = ClassMetric
    return {
        int(label): (int(n or 0), int(ok or 0), int(p or 0))
        for label, n, ok, p in session.execute(
            select(cm.label, func.sum(cm.support), func.sum(cm.correct), func.sum(cm.predicted))
            .where(*conds)
            .group_by(cm.label)
        ).tuples()
    }


def shadow_summary(
    session: Session, *, line: str, challenger: int, since: datetime, until: datetime
) -> ShadowSummary:
    """Sums of the shadow figures devices reported for ``challenger`` in [since, until]."""
    sm = ShadowMetric
    row = session.execute(
        select(
            func.sum(sm.compared),
            func.sum(sm.agreed),
            func.sum(sm.labelled),
            func.sum(sm.champion_correct),
            func.sum(sm.challenger_correct),
            func.sum(sm.errors),
        ).where(
            sm.model_line == line,
            sm.challenger_version == challenger,
            sm.received_at >= since,
            sm.received_at <= until,
        )
    ).one()
    cm = ClassMetric
    window = (
        cm.model_line == line,
        cm.model_version == challenger,
        cm.received_at >= since,
        cm.received_at <= until,
    )
    compared, agreed, labelled, champ_ok, chall_ok, errors = (int(v or 0) for v in row)
    return ShadowSummary(
        compared=compared,
        agreed=agreed,
        labelled=labelled,
        champion_correct=champ_ok,
        challenger_correct=chall_ok,
        errors=errors,
        challenger_classes=_class_sums(session, *window, cm.source == "shadow"),
        champion_classes=_class_sums(session, *window, cm.source == "shadow_champion"),
    )
