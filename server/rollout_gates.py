"""Quality gates on live device metrics (pure): is the new model as good as the champion?

The evidence is what devices report in MetricsReport windows, summed per model version:
inferences, errors, labelled inferences, correct ones and p95 latency. The challenger's sums come
from every device of the rollout that runs the new version; the reference is the champion on the
same days (control: every device still on the old version since approval), or, when no control
traffic exists, the rollout devices' own history on the old version before approval (baseline).

Gates (each a bound from settings):
- evidence: at least ``min_labelled`` labelled inferences on the new version, else wait;
- accuracy: not below the reference by more than ``max_accuracy_drop`` (absolute), where the
  drop must also be significant (one-sided two-proportion z >= ``accuracy_z``; 0 disables);
- error rate: errors / inferences at most ``max_error_rate``;
- latency: p95 at most ``max_latency_ratio`` x the reference p95 + ``latency_slack_ms``.
Per-class recall is not gated: devices report no per-class counts (see the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GateBounds:
    min_labelled: int = 50  # labelled inferences on the new version before judging
    max_accuracy_drop: float = 0.02  # absolute accuracy
    accuracy_z: float = 2.0  # one-sided z the drop must reach too (0: the bound alone)
    max_error_rate: float = 0.01  # errors / inferences
    max_latency_ratio: float = 2.0  # new p95 / reference p95
    latency_slack_ms: float = 1.0  # ms


@dataclass(frozen=True)
class MetricSummary:
    """Sums over metric windows; ``p95_ms`` is the inference-weighted mean of window p95s."""

    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    p95_ms: float | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inferences": self.inferences,
            "errors": self.errors,
            "labelled": self.labelled,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "error_rate": self.error_rate,
            "p95_ms": self.p95_ms,
        }


@dataclass(frozen=True)
class GateResult:
    """``ok`` False: a gate failed (roll back); ``enough`` False: wait for evidence."""

    ok: bool
    enough: bool
    reason: str
    detail: dict[str, Any]


def _drop_z(acc: float, n: int, ref_acc: float, ref_n: int) -> float:
    """One-sided z of (reference - new) accuracy, pooled two-proportion test."""
    pooled = (acc * n + ref_acc * ref_n) / (n + ref_n)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-9) * (1 / n + 1 / ref_n))
    return (ref_acc - acc) / se


def evaluate(
    new: MetricSummary,
    control: MetricSummary | None,
    baseline: MetricSummary | None,
    bounds: GateBounds,
) -> GateResult:
    """Judge the new version's live metrics against the champion's."""
    need = max(bounds.min_labelled, 1)
    reference, ref_name = control, "control"
    control_weak = control is None or control.labelled < need
    no_control = control is None or control.inferences == 0
    if control_weak and baseline is not None and (baseline.labelled >= need or no_control):
        reference, ref_name = baseline, "baseline"
    if reference is not None and reference.inferences == 0:
        reference = None
    detail: dict[str, Any] = {
        "new": new.to_dict(),
        "reference": ref_name if reference is not None else None,
        "reference_metrics": reference.to_dict() if reference is not None else None,
    }

    def fail(reason: str) -> GateResult:
        return GateResult(False, True, reason, detail)

    err = new.error_rate
    if err is not None and new.inferences >= max(bounds.min_labelled, 1):
        detail["error_rate_ok"] = err <= bounds.max_error_rate
        if err > bounds.max_error_rate:
            return fail(
                f"error rate {err:.2%} exceeds {bounds.max_error_rate:.2%} "
                f"over {new.inferences} inferences"
            )
    enough = new.labelled >= bounds.min_labelled
    if enough and reference is not None:
        acc, ref_acc = new.accuracy, reference.accuracy
        if acc is not None and ref_acc is not None:
            drop = ref_acc - acc
            z = _drop_z(acc, new.labelled, ref_acc, reference.labelled) if reference.labelled else 0
            detail["accuracy_drop"] = drop
            detail["accuracy_drop_z"] = z
            significant = bounds.accuracy_z <= 0 or z >= bounds.accuracy_z
            if drop > bounds.max_accuracy_drop and significant:
                return fail(
                    f"accuracy {acc:.3f} is below {ref_name} {ref_acc:.3f} by more than "
                    f"{bounds.max_accuracy_drop:.3f} ({new.labelled} labelled, z={z:.1f})"
                )
        if new.p95_ms is not None and reference.p95_ms is not None:
            limit = bounds.max_latency_ratio * reference.p95_ms + bounds.latency_slack_ms
            detail["p95_limit_ms"] = limit
            if new.p95_ms > limit:
                return fail(
                    f"p95 latency {new.p95_ms:.2f} ms exceeds {limit:.2f} ms "
                    f"({bounds.max_latency_ratio}x {ref_name} {reference.p95_ms:.2f} ms + slack)"
                )
    if not enough:
        return GateResult(
            True,
            False,
            f"waiting for evidence: {new.labelled} of {bounds.min_labelled} labelled inferences",
            detail,
        )
    if new.accuracy is None:
        return GateResult(True, True, "gates hold: no labelled evidence required", detail)
    summary = f"accuracy {new.accuracy:.3f} on {new.labelled} labelled"
    if reference is not None and reference.accuracy is not None:
        summary += f" vs {ref_name} {reference.accuracy:.3f}"
    elif bounds.min_labelled > 0:
        summary += " (no reference traffic)"
    return GateResult(True, True, f"gates hold: {summary}", detail)
