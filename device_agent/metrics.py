"""Live metrics per model version over a window, turned into contract.MetricsReport messages.

Counters are kept per model version because a window can straddle a hot swap: inferences and
ground truth are attributed to the model that actually made the prediction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from contract.messages import MAX_CLASS_INDEX, ClassCount, MetricsReport, ShadowFigures

MAX_TRACKED_CLASSES = 1024  # per-class entries kept per version and window (the wire limit)


@dataclass
class _Window:
    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    classes: dict[int, list[int]] = field(default_factory=dict)  # label -> [support, ok, pred]

    def count_class(self, true_label: int, predicted_label: int | None) -> None:
        count_class(self.classes, true_label, predicted_label)

    def class_counts(self) -> tuple[ClassCount, ...]:
        return class_counts(self.classes)


def count_class(classes: dict[int, list[int]], true_label: int, predicted: int | None) -> None:
    """One labelled prediction into ``label -> [support, correct, predicted]`` (bounded)."""
    for label, slot in ((true_label, 0), (predicted, 2)):
        if label is None:
            continue
        c = classes.get(label)
        if c is None:
            if len(classes) >= MAX_TRACKED_CLASSES or not 0 <= label <= MAX_CLASS_INDEX:
                continue
            c = classes[label] = [0, 0, 0]
        c[slot] += 1
        if slot == 0 and predicted == true_label:
            c[1] += 1


def class_counts(classes: dict[int, list[int]]) -> tuple[ClassCount, ...]:
    return tuple(ClassCount(k, n, ok, p) for k, (n, ok, p) in sorted(classes.items()))


class Metrics:
    """Thread-safe window counters; ``snapshot_and_reset`` closes the window."""

    def __init__(
        self,
        *,
        device_id: str,
        model_line: str,
        clock: Callable[[], float],
        latency_samples_max: int = 10_000,  # latencies kept per version and window
    ) -> None:
        self._device_id = device_id
        self._model_line = model_line
        self._clock = clock
        self._latency_max = latency_samples_max
        self._lock = threading.Lock()
        self._windows: dict[int, _Window] = {}
        self._window_start = clock()
        self.total_inferences = 0  # since start, for status()

    def _w(self, version: int) -> _Window:
        w = self._windows.get(version)
        if w is None:
            w = self._windows[version] = _Window()
        return w

    def record_inference(self, version: int, latency_ms: float) -> None:
        with self._lock:
            w = self._w(version)
            w.inferences += 1
            self.total_inferences += 1
            if len(w.latencies_ms) < self._latency_max:
                w.latencies_ms.append(latency_ms)

    def record_error(self, version: int) -> None:
        """An inference that raised: counts as an inference and as an error."""
        with self._lock:
            w = self._w(version)
            w.inferences += 1
            w.errors += 1
            self.total_inferences += 1

    def record_label(
        self,
        version: int,
        correct: bool,
        true_label: int | None = None,
        predicted_label: int | None = None,
    ) -> None:
        """Ground truth for one of ``version``'s predictions; the labels feed the per-class
        counts (per-class recall gates)."""
        with self._lock:
            w = self._w(version)
            w.labelled += 1
            w.correct += int(correct)
            if true_label is not None:
                w.count_class(true_label, predicted_label)

    def snapshot_and_reset(
        self,
        *,
        serving_version: int | None = None,
        rollout_id: int | None = None,
        shadow: ShadowFigures | None = None,
    ) -> list[MetricsReport]:
        """Close the window: one report per version with activity, plus the serving version
        (so an idle device still shows it is alive). ``rollout_id`` and ``shadow`` (the figures
        of a challenger run beside the serving model) go on the serving version's report."""
        now = self._clock()
        with self._lock:
            windows, self._windows = self._windows, {}
            start, self._window_start = self._window_start, now
        if serving_version is None:
            shadow = None
        elif serving_version not in windows:
            windows[serving_version] = _Window()
        window_s = max(now - start, 1e-3)
        reports = []
        for version, w in sorted(windows.items()):
            lat = np.asarray(w.latencies_ms, dtype=np.float64)
            p50 = float(np.percentile(lat, 50)) if lat.size else 0.0
            p95 = float(np.percentile(lat, 95)) if lat.size else 0.0
            reports.append(
                MetricsReport(
                    device_id=self._device_id,
                    ts=now,
                    model_line=self._model_line,
                    model_version=version,
                    window_s=window_s,
                    inferences=w.inferences,
                    errors=w.errors,
                    labelled=w.labelled,
                    correct=w.correct,
                    latency_ms_p50=p50,
                    latency_ms_p95=p95,
                    rollout_id=rollout_id if version == serving_version else None,
                    class_counts=w.class_counts(),
                    shadow=shadow if version == serving_version else None,
                )
            )
        return reports
