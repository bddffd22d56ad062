"""Monitoring windows as the dashboard draws them: per (model version, device group), oldest
first, each window's drift verdict reduced to one score against one threshold line.

Read-only: it queries ``monitor_windows`` (written by :mod:`server.monitoring.alerts`) and
changes nothing.

- Drift score: the largest of ``statistic / its calibrated threshold`` over the window's signals
  and both statistics (PSI and Jensen-Shannon). A signal breaches when either statistic is over
  its threshold (:class:`server.monitoring.drift.SignalScore`), so a window with enough samples
  breaches exactly when its score is above :data:`DRIFT_THRESHOLD`: one line on a chart holds
  every signal's own calibrated threshold. (``monitor_windows.drift_ratio`` is the PSI ratio
  only; a window can breach on Jensen-Shannon with it below 1.)
- Accuracy floor: the version's reference accuracy minus ``alert_max_accuracy_drop``. The
  ``estimated_accuracy`` rule breaches when the estimate is under it, ``live_accuracy`` when even
  the live accuracy's upper bound is (``server.monitoring.rules.observe``).
- Estimate trusted: False for a window whose drift verdict breaches, where the label-free
  estimate's assumption does not hold (``server.monitoring.estimate.estimate_trusted``); the
  dashboard marks such an estimate unreliable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.monitoring import ALL_DEVICES, MAX_LISTED, MonitorWindow
from server.monitoring.estimate import estimate_trusted

DRIFT_THRESHOLD = 1.0  # a drift score above this is a breach (each signal's own threshold)


@dataclass(frozen=True)
class SeriesKey:
    """One (version, group) that has evaluated windows."""

    version: int
    group: str
    windows: int
    last_window: datetime


@dataclass(frozen=True)
class DriftScore:
    """A window's drift verdict as one number, and the signal that set it."""

    score: float
    signal: str
    statistic: str  # "psi" or "js"


@dataclass(frozen=True)
class SeriesPoint:
    """One evaluated window of one (version, group), as the dashboard plots it."""

    window_start: datetime
    window_end: datetime
    devices: int
    samples: int
    drift_score: float | None  # None: not scored (no summaries, no reference)
    drift_signal: str | None  # the signal with the highest score
    drift_breach: bool | None  # the window's verdict (enough samples and score > 1)
    drifted: list[str]  # signals over their thresholds, worst first
    estimated_accuracy: float | None
    estimated_low: float | None
    estimated_high: float | None
    estimate_trusted: bool | None  # False: the drift verdict breaches (None: cannot tell)
    reference_accuracy: float | None
    accuracy_floor: float | None  # reference_accuracy - max_accuracy_drop
    labelled: int
    live_accuracy: float | None
    live_low: float | None
    live_high: float | None
    breaches: list[str]  # rules this window breached


def _ratio(value: Any, threshold: Any) -> float | None:
    if not isinstance(value, int | float) or not isinstance(threshold, int | float):
        return None
    if not (math.isfinite(value) and math.isfinite(threshold)):
        return None
    return float(value) / max(float(threshold), 1e-12)


def drift_score(drift: Mapping[str, Any] | None) -> DriftScore | None:
    """The highest ``statistic / threshold`` of a stored verdict (``WindowVerdict.to_dict()``);
    None when it scored no signal. Entries that are not numbers are skipped."""
    best: DriftScore | None = None
    scores: Sequence[Any] = (drift or {}).get("scores") or []
    for s in scores:
        if not isinstance(s, Mapping):
            continue
        for stat in ("psi", "js"):
            r = _ratio(s.get(stat), s.get(f"{stat}_threshold"))
            if r is not None and (best is None or r > best.score):
                best = DriftScore(r, str(s.get("signal")), stat)
    return best


def point_of(w: MonitorWindow, *, max_accuracy_drop: float) -> SeriesPoint:
    score = drift_score(w.drift)
    ref = w.reference_accuracy
    return SeriesPoint(
        window_start=w.window_start,
        window_end=w.window_end,
        devices=w.devices,
        samples=w.samples,
        drift_score=score.score if score else None,
        drift_signal=score.signal if score else None,
        drift_breach=w.drift_breach,
        drifted=list(w.drifted or []),
        estimated_accuracy=w.estimated_accuracy,
        estimated_low=w.estimated_low,
        estimated_high=w.estimated_high,
        estimate_trusted=estimate_trusted(w.estimated_accuracy, w.drift),
        reference_accuracy=ref,
        accuracy_floor=ref - max_accuracy_drop if ref is not None else None,
        labelled=w.labelled,
        live_accuracy=w.live_accuracy,
        live_low=w.live_low,
        live_high=w.live_high,
        breaches=list(w.breaches or []),
    )


def series_keys(session: Session, *, line: str) -> list[SeriesKey]:
    """Every (version, group) of ``line`` with evaluated windows: newest version first, the
    version's whole fleet (group ``*``) before its groups, groups by name."""
    rows = session.execute(
        select(
            MonitorWindow.model_version,
            MonitorWindow.group_name,
            func.count(),
            func.max(MonitorWindow.window_start),
        )
        .where(MonitorWindow.model_line == line)
        .group_by(MonitorWindow.model_version, MonitorWindow.group_name)
    ).tuples()
    keys = [SeriesKey(v, g, int(n), last) for v, g, n, last in rows]
    keys.sort(key=lambda k: (-k.version, k.group != ALL_DEVICES, k.group))
    return keys


def series(
    session: Session,
    *,
    line: str,
    version: int,
    group: str,
    max_accuracy_drop: float,
    limit: int = MAX_LISTED,
) -> list[SeriesPoint]:
    """The newest ``limit`` windows of one (version, group), oldest first."""
    rows = session.scalars(
        select(MonitorWindow)
        .where(
            MonitorWindow.model_line == line,
            MonitorWindow.model_version == version,
            MonitorWindow.group_name == group,
        )
        .order_by(MonitorWindow.window_start.desc())
        .limit(min(limit, MAX_LISTED))
    ).all()
    return [point_of(w, max_accuracy_drop=max_accuracy_drop) for w in reversed(rows)]


__all__ = [
    "DRIFT_THRESHOLD",
    "DriftScore",
    "SeriesKey",
    "SeriesPoint",
    "drift_score",
    "point_of",
    "series",
    "series_keys",
]
