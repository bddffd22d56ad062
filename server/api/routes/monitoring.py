"""Monitoring of a model line: the evaluated windows, and the series the dashboard draws."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from server.api.deps import ServicesDep, SessionDep, ViewerDep
from server.api.schemas import Group, MonitorWindowPublic, Name
from server.db import monitoring, registry
from server.monitoring import series as monitor_series

MAX_INT32 = 2**31 - 1

router = APIRouter(tags=["monitoring"])


class SeriesKeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: int
    group: str
    windows: int
    last_window: datetime


class SeriesPointPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    window_start: datetime
    window_end: datetime
    devices: int
    samples: int
    drift_score: float | None
    drift_signal: str | None
    drift_breach: bool | None
    drifted: list[str]
    estimated_accuracy: float | None
    estimated_low: float | None
    estimated_high: float | None
    estimate_trusted: bool | None  # False: the drift verdict breaches, the estimate may be far off
    reference_accuracy: float | None
    accuracy_floor: float | None
    labelled: int
    live_accuracy: float | None
    live_low: float | None
    live_high: float | None
    breaches: list[str]


class MonitorSeriesPublic(BaseModel):
    model_line: str
    version: int | None  # the series' key; None when the line has no evaluated window
    group: str | None
    window_s: float  # seconds per window (the server's monitor_window_s)
    drift_threshold: float  # a drift score above it breaches
    max_accuracy_drop: float  # accuracy floor = reference accuracy - this
    keys: list[SeriesKeyPublic]  # every (version, group) with windows
    points: list[SeriesPointPublic]  # oldest first


@router.get(
    "/api/v1/model-lines/{name}/monitoring/windows", response_model=list[MonitorWindowPublic]
)
def list_windows(
    name: Name,
    _op: ViewerDep,
    session: SessionDep,
    version: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
    group: Group | None = None,
    limit: Annotated[int, Query(ge=1, le=monitoring.MAX_LISTED)] = 100,
) -> Any:
    """Evaluated windows, newest first: drift verdict (PSI and Jensen-Shannon per signal with
    their calibrated thresholds), estimated and live accuracy, latency, errors, the rules each
    breached. ``group=*`` is a version's whole fleet."""
    registry.get_model_line(session, name=name)  # 404 for an unknown line
    return monitoring.list_windows(
        session, model_line=name, model_version=version, group=group, limit=limit
    )


@router.get("/api/v1/model-lines/{name}/monitoring/series", response_model=MonitorSeriesPublic)
def get_series(
    name: Name,
    _op: ViewerDep,
    session: SessionDep,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
    group: Group | None = None,
    limit: Annotated[int, Query(ge=1, le=monitoring.MAX_LISTED)] = 200,
) -> Any:
    """One (version, group)'s windows, oldest first, as the dashboard draws them: the drift score
    (the highest statistic / calibrated threshold over the signals: above 1 is a breach),
    estimated and live accuracy and the accuracy floor the alert rules hold them to; and every
    (version, group) that has windows. Without ``version`` the newest version with windows is
    shown, without ``group`` its whole fleet (``*``)."""
    registry.get_model_line(session, name=name)  # 404 for an unknown line
    if version is not None:
        registry.get_version(session, line=name, version=version)  # 404 for an unknown version
    keys = monitor_series.series_keys(session, line=name)
    if version is None and keys:
        version = keys[0].version
    if group is None and version is not None:
        group = monitoring.ALL_DEVICES
    settings = services.settings
    points = (
        monitor_series.series(
            session,
            line=name,
            version=version,
            group=group,
            max_accuracy_drop=settings.alert_max_accuracy_drop,
            limit=limit,
        )
        if version is not None and group is not None
        else []
    )
    return MonitorSeriesPublic(
        model_line=name,
        version=version,
        group=group,
        window_s=settings.monitor_window_s,
        drift_threshold=monitor_series.DRIFT_THRESHOLD,
        max_accuracy_drop=settings.alert_max_accuracy_drop,
        keys=[SeriesKeyPublic.model_validate(k) for k in keys],
        points=[SeriesPointPublic.model_validate(p) for p in points],
    )
