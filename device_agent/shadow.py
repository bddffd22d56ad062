"""Shadow runs: a challenger model beside the serving champion, never on the answer path.

A release signed with ``deployment: "shadow"`` is not swapped in. The updater builds its session
(``ModelRuntime.load``: headroom check, warm-up, self-test) and hands it to a ``ShadowRunner``.
Each served prediction is queued (bounded; dropped and counted when full) for a worker thread
that runs the challenger on the same input; the caller already holds the champion's answer, so
the challenger adds no latency to it. Per window the runner reports ``ShadowFigures``: inputs
compared, argmax agreement, and on labelled feedback the accuracy and per-class counts of both
models on the same inputs. Ground truth that arrives before the worker compared its input is
kept (bounded) and applied when it does.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from contract.messages import ShadowFigures
from device_agent.errors import InferenceError
from device_agent.metrics import class_counts, count_class
from device_agent.runtime import Loaded, classify

log = logging.getLogger(__name__)


@dataclass
class _Counts:
    compared: int = 0
    agreed: int = 0
    labelled: int = 0
    champion_correct: int = 0
    challenger_correct: int = 0
    errors: int = 0
    challenger_classes: dict[int, list[int]] = field(default_factory=dict)  # [n, ok, pred]
    champion_classes: dict[int, list[int]] = field(default_factory=dict)


class ShadowRunner:
    """Runs ``loaded`` (the challenger) on the inputs the champion served.

    Args:
        loaded: the challenger's verified, warmed session.
        queue_max: inputs waiting for the challenger; beyond it inputs are skipped.
        pending_max: predictions remembered for their ground truth (oldest evicted).
    """

    def __init__(
        self,
        loaded: Loaded,
        *,
        queue_max: int = 256,
        pending_max: int = 10_000,
    ) -> None:
        self.loaded = loaded
        self._queue: queue.Queue[tuple[str, np.ndarray, int] | None] = queue.Queue(queue_max)
        self._pending_max = pending_max
        self._lock = threading.Lock()
        self._results: OrderedDict[str, tuple[int, int]] = OrderedDict()  # pid -> (champ, chall)
        self._early: OrderedDict[str, int] = OrderedDict()  # truth before the comparison ran
        self._queued: set[str] = set()
        self._counts = _Counts()
        self.skipped = 0  # inputs dropped because the queue was full
        self.compared_total = 0
        self._thread = threading.Thread(
            target=self._run, name=f"shadow-v{loaded.model_version}", daemon=True
        )

    @property
    def model_version(self) -> int:
        return self.loaded.model_version

    @property
    def sha256(self) -> str:
        return self.loaded.sha256

    def start(self) -> ShadowRunner:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker; pending inputs are dropped. The session is freed with the runner."""
        while True:
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- called from the serving path (cheap, never blocks) -------------------------------------
    def submit(self, prediction_id: str, x: np.ndarray, champion_label: int) -> None:
        item = (prediction_id, np.array(x, dtype=np.float32), champion_label)
        with self._lock:
            self._queued.add(prediction_id)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._queued.discard(prediction_id)
                self.skipped += 1

    def label(self, prediction_id: str, true_label: int) -> None:
        """Ground truth for a served prediction (ignored if it was never compared)."""
        with self._lock:
            pair = self._results.pop(prediction_id, None)
            if pair is not None:
                self._count_label(pair, true_label)
            elif prediction_id in self._queued:
                self._early[prediction_id] = true_label
                while len(self._early) > self._pending_max:
                    self._early.popitem(last=False)

    def snapshot_and_reset(self) -> ShadowFigures:
        with self._lock:
            c, self._counts = self._counts, _Counts()
        return ShadowFigures(
            model_version=self.model_version,
            compared=c.compared,
            agreed=c.agreed,
            labelled=c.labelled,
            champion_correct=c.champion_correct,
            challenger_correct=c.challenger_correct,
            errors=c.errors,
            class_counts=class_counts(c.challenger_classes),
            champion_class_counts=class_counts(c.champion_classes),
        )

    # ---- the worker ------------------------------------------------------------------------------
    def _count_label(self, pair: tuple[int, int], truth: int) -> None:
        champ, chall = pair
        c = self._counts
        c.labelled += 1
        c.champion_correct += int(champ == truth)
        c.challenger_correct += int(chall == truth)
        count_class(c.challenger_classes, truth, chall)
        count_class(c.champion_classes, truth, champ)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pid, x, champ = item
            try:
                chall: int | None = classify(self.loaded, x).label
            except (InferenceError, ValueError) as exc:
                log.warning("shadow model v%d failed: %s", self.model_version, exc)
                chall = None
            with self._lock:
                self._queued.discard(pid)
                truth = self._early.pop(pid, None)
                if chall is None:
                    self._counts.errors += 1
                    continue
                self._counts.compared += 1
                self._counts.agreed += int(chall == champ)
                self.compared_total += 1
                if truth is not None:
                    self._count_label((champ, chall), truth)
                else:
                    self._results[pid] = (champ, chall)
                    while len(self._results) > self._pending_max:
                        self._results.popitem(last=False)
