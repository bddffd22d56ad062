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
- latency: p95 at most ``max_latency_ratio`` x the reference p95 + ``latency_slack_ms``;
- per-class recall (``classes``: true label -> (support, correct) from the devices' per-class
  counts): for every class with at least ``min_class_support`` labelled samples on both sides,
  recall not below the reference's by more than ``max_class_recall_drop`` (absolute; the drop
  must reach ``accuracy_z`` too). A class that looks regressed on fewer samples than that (on
  either side) makes the gate wait for evidence instead of passing it; a class that looks fine
  never holds a wave. A champion that over-predicts a class (e.g. collapsed under drift) has a
  high recall there, so a challenger that fixes the collapse would look regressed: when devices
  report predicted counts, a recall drop is excused if the class's F1 did not drop by more than
  the same bound (the recall lost was bought back in precision).

``evaluate_shadow`` judges a shadow wave: the challenger ran beside the champion on the same
inputs, so the two accuracies (and per-class counts) are paired on identical traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

# class -> (support, correct[, predicted]): samples of the class, how many of those the model
# got right, and how many labelled inputs it put in the class (absent/0 from older agents).
ClassCounts = Mapping[int, tuple[int, ...]]
MAX_CLASS_DETAIL = 10  # classes listed in a gate's detail (the worst drops first)


@dataclass(frozen=True)
class GateBounds:
    min_labelled: int = 50  # labelled inferences on the new version before judging
    max_accuracy_drop: float = 0.02  # absolute accuracy
    accuracy_z: float = 2.0  # one-sided z the drop must reach too (0: the bound alone)
    max_error_rate: float = 0.01  # errors / inferences
    max_latency_ratio: float = 2.0  # new p95 / reference p95
    latency_slack_ms: float = 1.0  # ms
    min_class_support: int = 20  # labelled samples of a class (each side) before judging it
    max_class_recall_drop: float = 0.10  # absolute recall of any one class


@dataclass(frozen=True)
class MetricSummary:
    """Sums over metric windows; ``p95_ms`` is the inference-weighted mean of window p95s."""

    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    p95_ms: float | None = None
    classes: ClassCounts = field(default_factory=dict)

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


def _triple(counts: tuple[int, ...]) -> tuple[int, int, int]:
    return counts[0], counts[1], counts[2] if len(counts) > 2 else 0


def _has_predicted(classes: ClassCounts) -> bool:
    return any(len(c) > 2 and c[2] > 0 for c in classes.values())


def _f1(correct: int, support: int, predicted: int) -> float:
    """Per-class F1 from counts (0 when the class was never predicted or never right)."""
    if correct == 0 or predicted == 0:
        return 0.0
    precision, recall = correct / predicted, correct / support
    return 2 * precision * recall / (precision + recall)


def _class_name(label: int, names: Sequence[str]) -> str:
    return f"class {label} ({names[label]!r})" if 0 <= label < len(names) else f"class {label}"


@dataclass(frozen=True)
class ClassVerdict:
    """The per-class recall gate: ``failed``/``suspect`` name a class (or are None)."""

    failed: str | None
    suspect: str | None
    detail: list[dict[str, Any]]


def _corrected_z(z: float, comparisons: int) -> float:
    """The one-sided z a single test needs so that ``comparisons`` tests together keep the
    false-alarm rate of one test at ``z`` (Bonferroni)."""
    if z <= 0 or comparisons <= 1:
        return z
    alpha = (1.0 - NormalDist().cdf(z)) / comparisons
    return NormalDist().inv_cdf(1.0 - alpha)


def class_recall_gate(
    new: ClassCounts,
    reference: ClassCounts,
    bounds: GateBounds,
    names: Sequence[str] = (),
) -> ClassVerdict:
    """Per-class recall of ``new`` against ``reference`` (pure).

    A class is judged once both sides hold ``min_class_support`` of its samples: a drop beyond
    ``max_class_recall_drop`` (and significant at ``accuracy_z``, Bonferroni-corrected for the
    number of classes compared, so that ten classes do not give a good model ten chances to
    fail by noise) fails. With fewer on either
    side such a drop is only ``suspect`` (wait for evidence); a class that looks fine never
    holds anything up. (In a shadow wave both sides saw the same inputs, so the supports match.)
    When both sides report predicted counts, a recall drop whose class F1 did not drop by more
    than the same bound is excused: the reference over-predicted that class.
    """
    need = max(bounds.min_class_support, 1)
    rows: list[dict[str, Any]] = []
    failed: tuple[float, str] | None = None
    suspect: tuple[float, str] | None = None
    with_precision = _has_predicted(new) and _has_predicted(reference)
    z_needed = _corrected_z(
        bounds.accuracy_z,
        sum(1 for lb in reference if _triple(reference[lb])[0] and _triple(new.get(lb, (0, 0)))[0]),
    )
    for label in sorted(reference):
        ref_n, ref_ok, ref_pred = _triple(reference[label])
        n, ok, pred = _triple(new.get(label, (0, 0)))
        if ref_n == 0 or n == 0:
            continue
        recall, ref_recall = ok / n, ref_ok / ref_n
        drop = ref_recall - recall
        z = _drop_z(recall, n, ref_recall, ref_n)
        row: dict[str, Any] = {
            "label": label,
            "recall": recall,
            "support": n,
            "reference_recall": ref_recall,
            "reference_support": ref_n,
            "drop": drop,
            "z": z,
        }
        rows.append(row)
        if drop <= bounds.max_class_recall_drop:
            continue
        if with_precision:
            f1, ref_f1 = _f1(ok, n, pred), _f1(ref_ok, ref_n, ref_pred)
            row["f1"], row["reference_f1"] = f1, ref_f1
            if ref_f1 - f1 <= bounds.max_class_recall_drop:
                # The reference bought this recall by over-predicting the class (e.g. a
                # champion collapsed under drift): the recall lost is precision gained.
                row["excused"] = "F1 did not drop: the reference over-predicted this class"
                continue
        text = (
            f"{_class_name(label, names)} recall {recall:.3f} ({ok}/{n}) is below the "
            f"reference {ref_recall:.3f} ({ref_ok}/{ref_n}) by {drop:.3f}, more than "
            f"{bounds.max_class_recall_drop:.3f}"
        )
        if min(n, ref_n) < need:
            if suspect is None or drop > suspect[0]:
                suspect = (drop, f"{text} on {min(n, ref_n)} of {need} samples needed")
        elif (bounds.accuracy_z <= 0 or z >= z_needed) and (failed is None or drop > failed[0]):
            failed = (drop, f"{text} (z={z:.1f}, {z_needed:.2f} needed)")
    rows.sort(key=lambda r: -r["drop"])
    return ClassVerdict(
        failed[1] if failed else None, suspect[1] if suspect else None, rows[:MAX_CLASS_DETAIL]
    )


def evaluate(
    new: MetricSummary,
    control: MetricSummary | None,
    baseline: MetricSummary | None,
    bounds: GateBounds,
    class_names: Sequence[str] = (),
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
    class_wait: str | None = None
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
        if new.classes and reference.classes:
            verdict = class_recall_gate(new.classes, reference.classes, bounds, class_names)
            detail["class_recall"] = verdict.detail
            if verdict.failed:
                return fail(f"per-class recall: {verdict.failed}")
            class_wait = verdict.suspect
        if new.p95_ms is not None and reference.p95_ms is not None:
            limit = bounds.max_latency_ratio * reference.p95_ms + bounds.latency_slack_ms
            detail["p95_limit_ms"] = limit
            if new.p95_ms > limit:
                return fail(
                    f"p95 latency {new.p95_ms:.2f} ms exceeds {limit:.2f} ms "
                    f"({bounds.max_latency_ratio}x {ref_name} {reference.p95_ms:.2f} ms + slack)"
                )
    if class_wait is not None:
        return GateResult(True, False, f"waiting for evidence: {class_wait}", detail)
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


@dataclass(frozen=True)
class ShadowSummary:
    """Sums of the shadow figures devices reported for one challenger (see ShadowFigures)."""

    compared: int = 0
    agreed: int = 0
    labelled: int = 0
    champion_correct: int = 0
    challenger_correct: int = 0
    errors: int = 0  # inputs the challenger failed on
    challenger_classes: ClassCounts = field(default_factory=dict)
    champion_classes: ClassCounts = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def to_dict(self) -> dict[str, Any]:
        n = self.labelled
        return {
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": self.agreement,
            "labelled": n,
            "champion_correct": self.champion_correct,
            "challenger_correct": self.challenger_correct,
            "champion_accuracy": self.champion_correct / n if n else None,
            "challenger_accuracy": self.challenger_correct / n if n else None,
            "errors": self.errors,
        }


def evaluate_shadow(
    shadow: ShadowSummary, bounds: GateBounds, class_names: Sequence[str] = ()
) -> GateResult:
    """Judge a challenger that ran in shadow beside the champion on the same labelled inputs.

    Gates: ``min_labelled`` labelled compared inputs (else wait); challenger error rate at most
    ``max_error_rate``; challenger accuracy not below the champion's by more than
    ``max_accuracy_drop`` (significant at ``accuracy_z``); the per-class recall gate on the
    challenger's per-class counts against the champion's on the same inputs.
    """
    detail: dict[str, Any] = {"shadow": shadow.to_dict()}

    def fail(reason: str) -> GateResult:
        return GateResult(False, True, f"shadow gate: {reason}", detail)

    tried = shadow.compared + shadow.errors
    if tried >= max(bounds.min_labelled, 1) and shadow.errors / tried > bounds.max_error_rate:
        return fail(
            f"challenger failed on {shadow.errors} of {tried} inputs "
            f"({shadow.errors / tried:.2%} > {bounds.max_error_rate:.2%})"
        )
    n = shadow.labelled
    if n < bounds.min_labelled or n == 0:
        return GateResult(
            True,
            False,
            f"shadow: waiting for evidence: {n} of {bounds.min_labelled} labelled compared inputs",
            detail,
        )
    acc, ref = shadow.challenger_correct / n, shadow.champion_correct / n
    drop = ref - acc
    z = _drop_z(acc, n, ref, n)
    detail["accuracy_drop"], detail["accuracy_drop_z"] = drop, z
    if drop > bounds.max_accuracy_drop and (bounds.accuracy_z <= 0 or z >= bounds.accuracy_z):
        return fail(
            f"challenger accuracy {acc:.3f} is below the champion's {ref:.3f} on the same "
            f"{n} labelled inputs by more than {bounds.max_accuracy_drop:.3f} (z={z:.1f})"
        )
    verdict = class_recall_gate(
        shadow.challenger_classes, shadow.champion_classes, bounds, class_names
    )
    detail["class_recall"] = verdict.detail
    if verdict.failed:
        return fail(f"per-class recall: {verdict.failed}")
    if verdict.suspect:
        return GateResult(True, False, f"shadow: waiting for evidence: {verdict.suspect}", detail)
    agreement = shadow.agreement
    return GateResult(
        True,
        True,
        f"shadow gates hold: challenger accuracy {acc:.3f} vs champion {ref:.3f} on {n} "
        f"labelled, agreement {agreement:.3f} on {shadow.compared} inputs"
        if agreement is not None
        else f"shadow gates hold: challenger accuracy {acc:.3f} vs champion {ref:.3f}",
        detail,
    )
