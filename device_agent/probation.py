"""Metric-gated commit: live statistics per model and the pure probation verdict.

After a hot swap the new model serves live traffic on probation. ``judge`` compares what it did
(error rate, p95 latency, accuracy on labelled inferences) against the previous model's recent
live metrics and says: keep watching, commit, or roll back (with the reason). It is a pure
function of its inputs; the updater feeds it ``LiveTracker`` summaries and the elapsed time.

Accuracy is compared with a one-sided two-proportion z-test *and* a minimum absolute drop, so a
handful of unlucky labels does not roll back a good model, while a clearly worse one is caught
after as few as ``min_labelled_to_judge`` labels.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from device_agent.store import atomic_write


@dataclass(frozen=True)
class LiveSummary:
    """Recent live behaviour of one model (bounded window)."""

    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    latency_samples: int = 0
    p95_ms: float | None = None
    p50_ms: float | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LiveSummary:
        p95, p50 = d.get("p95_ms"), d.get("p50_ms")
        return cls(
            inferences=int(d.get("inferences", 0)),
            errors=int(d.get("errors", 0)),
            labelled=int(d.get("labelled", 0)),
            correct=int(d.get("correct", 0)),
            latency_samples=int(d.get("latency_samples", 0)),
            p95_ms=float(p95) if p95 is not None else None,
            p50_ms=float(p50) if p50 is not None else None,
        )


class _Recent:
    __slots__ = ("latencies", "labels")

    def __init__(self, max_inferences: int, max_labels: int) -> None:
        self.latencies: deque[float] = deque(maxlen=max_inferences)  # ms; NaN marks an error
        self.labels: deque[bool] = deque(maxlen=max_labels)  # was the prediction correct?


class LiveTracker:
    """Thread-safe bounded recent statistics per model (keyed by artifact sha256)."""

    def __init__(self, *, max_inferences: int = 2000, max_labels: int = 500) -> None:
        self._max_inf = max_inferences
        self._max_lab = max_labels
        self._lock = threading.Lock()
        self._by_sha: dict[str, _Recent] = {}

    def _r(self, sha: str) -> _Recent:
        r = self._by_sha.get(sha)
        if r is None:
            r = self._by_sha[sha] = _Recent(self._max_inf, self._max_lab)
        return r

    def record_inference(self, sha: str, latency_ms: float) -> None:
        with self._lock:
            self._r(sha).latencies.append(latency_ms)

    def record_error(self, sha: str) -> None:
        with self._lock:
            self._r(sha).latencies.append(math.nan)

    def record_label(self, sha: str, correct: bool) -> None:
        with self._lock:
            self._r(sha).labels.append(correct)

    def reset(self, sha: str) -> None:
        with self._lock:
            self._by_sha.pop(sha, None)

    def forget_except(self, keep: set[str]) -> None:
        """Drop the statistics of models no longer held (bounded memory across updates)."""
        with self._lock:
            for sha in [s for s in self._by_sha if s not in keep]:
                del self._by_sha[sha]

    def dump(self, path: Path, *, latencies_max: int = 200) -> None:
        """Persist recent statistics (atomic) so a baseline survives an agent restart."""
        with self._lock:
            data = {
                sha: {
                    "lat": [round(v, 4) if not math.isnan(v) else None for v in r.latencies][
                        -latencies_max:
                    ],
                    "lab": "".join("1" if c else "0" for c in r.labels),
                }
                for sha, r in self._by_sha.items()
            }
        atomic_write(path, json.dumps(data, separators=(",", ":")).encode())

    def load(self, path: Path) -> None:
        """Seed statistics from ``dump`` (missing or unreadable file: start empty)."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return
        if not isinstance(data, dict):
            return
        with self._lock:
            for sha, d in data.items():
                try:
                    r = self._r(str(sha))
                    r.latencies.extend(math.nan if v is None else float(v) for v in d["lat"])
                    r.labels.extend(c == "1" for c in str(d["lab"]))
                except (KeyError, TypeError, ValueError):
                    continue

    def summary(self, sha: str) -> LiveSummary:
        with self._lock:
            r = self._by_sha.get(sha)
            if r is None:
                return LiveSummary()
            lat = list(r.latencies)
            labels = list(r.labels)
        ok = sorted(v for v in lat if not math.isnan(v))
        return LiveSummary(
            inferences=len(lat),
            errors=len(lat) - len(ok),
            labelled=len(labels),
            correct=sum(labels),
            latency_samples=len(ok),
            p95_ms=quantile(ok, 0.95),
            p50_ms=quantile(ok, 0.50),
        )


@dataclass(frozen=True)
class ProbationPolicy:
    """When a model on probation is committed or rolled back. Units in comments."""

    min_labelled: int = 30  # labelled inferences that, if they hold, commit at once
    max_s: float = 60.0  # seconds: commit on this bound if nothing degraded (no labels needed)
    min_labelled_to_judge: int = 10  # labels (trial and baseline) before accuracy is compared
    max_accuracy_drop: float = 0.05  # absolute accuracy drop tolerated vs the previous model
    accuracy_z: float = 2.0  # one-sided z-score a drop must also reach (about p < 0.023)
    min_inferences_to_judge: int = 20  # inferences before the error rate is compared
    max_error_rate_increase: float = 0.02  # absolute increase of errors/inferences tolerated
    min_latency_samples: int = 50  # latencies (trial and baseline) before p95 is compared
    max_latency_ratio: float = 2.0  # trial p95 (and p50) may reach baseline's * ratio + slack
    latency_slack_ms: float = 5.0  # ms added to the latency bounds (absorbs scheduler noise)


class Action(StrEnum):
    CONTINUE = "continue"
    COMMIT = "commit"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str


def _z_drop(base_c: int, base_n: int, trial_c: int, trial_n: int) -> float:
    """One-sided z-score of "trial accuracy is lower than baseline" (pooled proportions)."""
    p1, p2 = base_c / base_n, trial_c / trial_n
    pooled = (base_c + trial_c) / (base_n + trial_n)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / base_n + 1 / trial_n))
    return (p1 - p2) / se


def quantile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of an ascending list; None when it is empty."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, int(math.ceil(q * len(ordered))) - 1))]


def _latency_bound(base_ms: float, policy: ProbationPolicy) -> float:
    """How slow the trial may get: the baseline's figure * ratio + slack (ms)."""
    return base_ms * policy.max_latency_ratio + policy.latency_slack_ms


def judge(
    trial: LiveSummary, baseline: LiveSummary | None, elapsed_s: float, policy: ProbationPolicy
) -> Verdict:
    """Decide a probation step. Degradation is checked before the commit bounds."""
    base = baseline or LiveSummary()
    if trial.inferences >= policy.min_inferences_to_judge and trial.errors:
        base_rate = base.error_rate or 0.0
        rate = trial.error_rate or 0.0
        if rate > base_rate + policy.max_error_rate_increase:
            return Verdict(
                Action.ROLLBACK,
                f"error rate {rate:.3f} over {trial.inferences} inferences vs {base_rate:.3f} "
                "for the previous model",
            )
    if (
        trial.p95_ms is not None
        and base.p95_ms is not None
        and trial.latency_samples >= policy.min_latency_samples
        and base.latency_samples >= policy.min_latency_samples
    ):
        # A slower model is slower on every inference: its median moves with its tail. A busy
        # host (a neighbour, the scheduler, the GIL) stretches only the tail, and p95 over a
        # few dozen inferences is a handful of them. So the tail over its bound rolls back only
        # when the median is over its own bound too (the baseline was measured at another time,
        # under another load: comparing tails alone rolled back good models on loaded hosts).
        bound = _latency_bound(base.p95_ms, policy)
        slower = (
            trial.p50_ms is None
            or base.p50_ms is None
            or trial.p50_ms > _latency_bound(base.p50_ms, policy)
        )
        if trial.p95_ms > bound and slower:
            median = (
                f"; p50 {trial.p50_ms:.2f} ms vs {base.p50_ms:.2f} ms"
                if trial.p50_ms is not None and base.p50_ms is not None
                else ""
            )
            return Verdict(
                Action.ROLLBACK,
                f"p95 latency {trial.p95_ms:.2f} ms vs {base.p95_ms:.2f} ms for the previous "
                f"model (bound {bound:.2f} ms){median}",
            )
    if (
        trial.labelled >= policy.min_labelled_to_judge
        and base.labelled >= policy.min_labelled_to_judge
    ):
        base_acc, acc = base.correct / base.labelled, trial.correct / trial.labelled
        z = _z_drop(base.correct, base.labelled, trial.correct, trial.labelled)
        if base_acc - acc > policy.max_accuracy_drop and z >= policy.accuracy_z:
            return Verdict(
                Action.ROLLBACK,
                f"accuracy {acc:.3f} on {trial.labelled} labelled inferences vs {base_acc:.3f} "
                f"on {base.labelled} for the previous model (z={z:.2f})",
            )
    if trial.labelled >= policy.min_labelled:
        return Verdict(Action.COMMIT, f"held on {trial.labelled} labelled inferences")
    if elapsed_s >= policy.max_s:
        return Verdict(
            Action.COMMIT,
            f"held for {elapsed_s:.0f} s ({trial.inferences} inferences, "
            f"{trial.labelled} labelled)",
        )
    return Verdict(Action.CONTINUE, "watching")
