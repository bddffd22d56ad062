"""One closed window of a model line, merged per (model version, device group) into figures.

A window holds the monitor summaries and the metrics reports the server *received* in it (its
own clock: device clocks are not trusted, and a window that has closed stays closed, so its
verdict is final). A device's backlog sent after an outage lands in the window it arrives in;
it is still that version's traffic, which is what drift is about.

Each report counts toward group :data:`~server.db.monitoring.ALL_DEVICES` (the version's whole
fleet) and toward each group the device belongs to *when the window is evaluated* (``devices
.groups``; evaluation follows the window's close within seconds). Per key the summaries' counts
are added up (``contract.monitoring.merge_counts``: they are mergeable sketches) and scored
against the version's reference; live accuracy, latency and error rate come from the metrics
reports. The latency figure is the inference-weighted mean of the reports' p95 (a report only
carries its own p95; the fleet's true p95 is not recoverable from them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from contract.monitoring import Signal
from server.db.fleet import Device, DeviceMetric
from server.db.monitoring import ALL_DEVICES, MonitorSummaryRow
from server.monitoring._errors import MonitoringError, NoReferenceError
from server.monitoring.drift import MIN_WINDOW_SAMPLES, WindowVerdict, score_window
from server.monitoring.estimate import AccuracyEstimate, estimate_accuracy, live_accuracy
from server.monitoring.references import ReferenceBook
from server.monitoring.rules import WindowFigures

Key = tuple[int, str]  # (model version, device group)


@dataclass
class _Acc:
    """What one key's reports add up to."""

    devices: set[str] = field(default_factory=set)
    summaries: int = 0
    samples: int = 0
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    signals: set[str] | None = None  # signals every summary carried
    ragged: set[str] = field(default_factory=set)  # signals whose bins disagreed
    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    p95_weighted: float = 0.0

    def add_summary(self, device_id: str, samples: int, counts: Mapping[str, list[int]]) -> None:
        self.devices.add(device_id)
        self.summaries += 1
        self.samples += samples
        names = set(counts)
        self.signals = names if self.signals is None else self.signals & names
        for name, c in counts.items():
            arr = np.asarray(c, np.int64)
            have = self.counts.get(name)
            if have is None:
                self.counts[name] = arr.copy()
            elif have.shape != arr.shape:
                self.ragged.add(name)
            else:
                have += arr

    def add_metrics(self, device_id: str, row: Any) -> None:
        self.devices.add(device_id)
        self.inferences += int(row.inferences)
        self.errors += int(row.errors)
        self.labelled += int(row.labelled)
        self.correct += int(row.correct)
        self.p95_weighted += float(row.p95) * int(row.inferences)

    def merged(self) -> dict[str, np.ndarray]:
        """Counts of the signals every summary carried with the same bins (so they share one
        sample count, which a verdict needs)."""
        keep = (self.signals or set()) - self.ragged
        return {name: arr for name, arr in self.counts.items() if name in keep}


@dataclass(frozen=True)
class KeyWindow:
    """One (version, group)'s figures in one window, as the rules and the window table take them."""

    version: int
    group: str
    devices: int
    summaries: int
    samples: int
    labelled: int
    correct: int
    figures: WindowFigures
    note: str | None = None  # why a figure is missing (no reference, bins that do not fit)


def _keys(version: int, groups: Iterable[str]) -> list[Key]:
    return [(version, ALL_DEVICES), *((version, g) for g in sorted(set(groups)))]


def gather(
    session: Session,
    *,
    line: str,
    start: datetime,
    end: datetime,
    references: ReferenceBook,
    min_samples: int = MIN_WINDOW_SAMPLES,
) -> list[KeyWindow]:
    """Every (version, group) with reports received in ``[start, end)``, with its figures.

    ``min_samples``: below it a drift verdict carries scores but no breach.
    """
    groups: dict[str, list[str]] = {
        d: [g for g in (gs or []) if isinstance(g, str)]
        for d, gs in session.execute(
            select(Device.device_id, Device.groups).where(Device.model_line == line)
        ).tuples()
    }
    acc: dict[Key, _Acc] = {}
    summaries = session.execute(
        select(
            MonitorSummaryRow.device_id,
            MonitorSummaryRow.model_version,
            MonitorSummaryRow.samples,
            MonitorSummaryRow.counts,
        ).where(
            MonitorSummaryRow.model_line == line,
            MonitorSummaryRow.received_at >= start,
            MonitorSummaryRow.received_at < end,
        )
    )
    for device_id, version, samples, counts in summaries:
        for key in _keys(version, groups.get(device_id, ())):
            acc.setdefault(key, _Acc()).add_summary(device_id, samples, counts or {})
    metrics = session.execute(
        select(
            DeviceMetric.device_id,
            DeviceMetric.model_version,
            DeviceMetric.inferences,
            DeviceMetric.errors,
            DeviceMetric.labelled,
            DeviceMetric.correct,
            DeviceMetric.p95,
        ).where(
            DeviceMetric.model_line == line,
            DeviceMetric.received_at >= start,
            DeviceMetric.received_at < end,
        )
    )
    for row in metrics:
        for key in _keys(row.model_version, groups.get(row.device_id, ())):
            acc.setdefault(key, _Acc()).add_metrics(row.device_id, row)
    return [
        _figures(session, line, key, a, references, min_samples) for key, a in sorted(acc.items())
    ]


def _figures(
    session: Session,
    line: str,
    key: Key,
    a: _Acc,
    references: ReferenceBook,
    min_samples: int,
) -> KeyWindow:
    version, group = key
    notes: list[str] = []
    drift: WindowVerdict | None = None
    estimate: AccuracyEstimate | None = None
    if a.summaries:
        if a.ragged:
            notes.append(f"signals {sorted(a.ragged)} disagree on their bins between summaries")
        try:
            scoring = references.scoring(session, line=line, version=version)
            merged = a.merged()
            drift = score_window(scoring.calibrator, merged, min_samples=min_samples)
            calibration = scoring.reference.calibration
            conf = merged.get(Signal.CONFIDENCE.value)
            if calibration is not None and conf is not None:
                estimate = estimate_accuracy(conf, calibration)
        except (NoReferenceError, MonitoringError) as exc:
            notes.append(str(exc)[:500])
    live = None
    if a.correct <= a.labelled:
        live = live_accuracy(a.correct, a.labelled)
    else:  # each report was checked; a sum cannot do this, but a note beats a dead thread
        notes.append(f"{a.correct} correct of {a.labelled} labelled: live accuracy left out")
    figures = WindowFigures(
        drift=drift,
        estimate=estimate,
        live=live,
        inferences=a.inferences,
        errors=min(a.errors, a.inferences),
        latency_p95_ms=a.p95_weighted / a.inferences if a.inferences else None,
    )
    return KeyWindow(
        version=version,
        group=group,
        devices=len(a.devices),
        summaries=a.summaries,
        samples=a.samples,
        labelled=a.labelled,
        correct=a.correct,
        figures=figures,
        note="; ".join(notes) or None,
    )


__all__ = ["Key", "KeyWindow", "gather"]
