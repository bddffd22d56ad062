"""Per-period histograms of the monitored signals: label-free drift monitoring on the device.

A model whose ONNX metadata carries a monitoring reference (``contract.monitoring``; inside the
signed bytes) is monitored; any other model is served exactly as before. :func:`load_reference`
reads and checks the reference when the model loads, off the serving path.

On every inference :meth:`Monitor.observe` copies the input and the probabilities into a
preallocated buffer (a few microseconds). Buffered rows are binned in one batch, with the
reference's own histogram function (the one training computed the reference with), when the
buffer fills or when the metrics thread calls :meth:`Monitor.flush` on its tick, so binning
rarely runs on an inference thread. :meth:`Monitor.snapshot_and_reset` closes the period: one
``MonitorSummary`` per model that served in it (a hot swap makes two), integer counts only; the
agent publishes them at QoS 1 and its outbox keeps them while the broker is away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from contract import MessageError
from contract.manifest import Manifest
from contract.monitoring import MonitoringReference, MonitorSummary, Signal

if TYPE_CHECKING:
    from device_agent.runtime import Loaded

log = logging.getLogger(__name__)

BUFFER_BYTES = 256 * 1024  # bytes of buffered inputs + probabilities per model before binning
MAX_BUFFER_ROWS = 512  # rows buffered per model before binning (bounds one binning's time)
MAX_MODELS_PER_PERIOD = 4  # models monitored in one period (a swap makes two); more are skipped


def load_reference(raw: str | None, manifest: Manifest) -> MonitoringReference | None:
    """The model's monitoring reference, or None: none in the metadata, or one that does not
    parse or does not fit the manifest (logged; the model still serves, unmonitored)."""
    if raw is None:
        return None
    try:
        ref = MonitoringReference.from_json(raw)
    except MessageError as exc:
        log.warning("model v%d: monitoring off: %s", manifest.model_version, exc)
        return None
    features, classes = manifest.input_spec.features, len(manifest.labels)
    problem = None
    if ref.features not in (0, features) or (ref.pca is not None and ref.pca.features != features):
        problem = f"the reference is for {ref.features} input values, the model takes {features}"
    elif Signal.PREDICTED in ref.names and ref.signal(Signal.PREDICTED).bins != classes:
        problem = f"the reference's predicted signal does not have {classes} classes"
    elif ref.classes not in (0, classes):
        problem = f"the reference is for {ref.classes} classes, the model has {classes}"
    if problem:
        log.warning("model v%d: monitoring off: %s", manifest.model_version, problem)
        return None
    return ref


class _Period:
    """One model's counts for the current period and its buffer of rows not yet binned (kept
    from period to period while the model serves, dropped after a period without traffic)."""

    def __init__(
        self, reference: MonitoringReference, model_version: int, features: int, classes: int
    ) -> None:
        self.reference = reference
        self.model_version = model_version
        rows = BUFFER_BYTES // (4 * (features + classes))
        rows = max(1, min(MAX_BUFFER_ROWS, rows))
        self.x = np.empty((rows, features), np.float32)
        self.p = np.empty((rows, classes), np.float32)
        self.fill = 0
        self.samples = 0
        self.counts = {s.name: np.zeros(s.bins, np.int64) for s in reference.signals}

    def add(self, x: np.ndarray, probabilities: np.ndarray) -> None:
        i = self.fill
        self.x[i] = x.reshape(-1)
        self.p[i] = probabilities.reshape(-1)
        self.fill = i + 1
        if self.fill == len(self.x):
            self.bin()

    def reset(self) -> None:
        self.samples = 0
        for c in self.counts.values():
            c[:] = 0

    def bin(self) -> None:
        n = self.fill
        if not n:
            return
        hist = self.reference.histogram(self.x[:n], self.p[:n])
        for name, c in hist.items():
            self.counts[name] += c
        self.samples += n
        self.fill = 0


class Monitor:
    """Thread-safe per-period signal histograms of every model that serves (see the module
    docstring). ``clock`` gives unix seconds (the period's start and end)."""

    def __init__(self, *, device_id: str, model_line: str, clock: Callable[[], float]) -> None:
        self._device_id = device_id
        self._model_line = model_line
        self._clock = clock
        self._lock = threading.Lock()
        self._periods: dict[str, _Period] = {}  # by model sha256
        self._start = clock()
        self.skipped = 0  # inferences not monitored: too many models in one period
        self.summaries = 0  # summaries produced since start

    def observe(self, loaded: Loaded, x: np.ndarray, probabilities: np.ndarray) -> None:
        """Count one inference of ``loaded`` (a no-op for a model without a reference)."""
        ref = loaded.monitoring
        if ref is None:
            return
        with self._lock:
            period = self._periods.get(loaded.sha256)
            if period is None:
                if len(self._periods) >= MAX_MODELS_PER_PERIOD:
                    self.skipped += 1
                    return
                spec = loaded.manifest
                period = self._periods[loaded.sha256] = _Period(
                    ref, loaded.model_version, spec.input_spec.features, len(spec.labels)
                )
            period.add(np.asarray(x), probabilities)

    def flush(self) -> None:
        """Bin the buffered rows now (the metrics thread calls this on its tick)."""
        with self._lock:
            for period in self._periods.values():
                period.bin()

    @property
    def pending(self) -> int:
        """Inferences counted in the current period (not yet in a summary)."""
        with self._lock:
            return sum(p.samples + p.fill for p in self._periods.values())

    def snapshot_and_reset(
        self, *, serving_sha256: str | None = None, release: int | None = None
    ) -> list[MonitorSummary]:
        """Close the period: one summary per model with inferences in it. ``release`` goes on
        the summary of the model ``serving_sha256`` (the release the agent installed it from)."""
        now = self._clock()
        out = []
        with self._lock:
            start, self._start = self._start, now
            for sha, period in list(self._periods.items()):
                period.bin()
                if not period.samples:  # idle for a whole period: let its buffers go
                    del self._periods[sha]
                    continue
                counts = tuple((name, tuple(c.tolist())) for name, c in period.counts.items())
                out.append(
                    MonitorSummary(
                        device_id=self._device_id,
                        model_line=self._model_line,
                        model_version=period.model_version,
                        release=release if sha == serving_sha256 else None,
                        start=start,
                        end=max(now, start),
                        samples=period.samples,
                        counts=counts,
                    )
                )
                period.reset()  # keeps its buffers: a model serving on needs them again
        self.summaries += len(out)
        return out


__all__ = ["Monitor", "load_reference"]
