"""Metrics and the champion/challenger gate (pure: predictions in, numbers and a verdict out).

Both models are scored from the probabilities ONNX Runtime computes from their ONNX files (see
:func:`training.export.onnx_predict_proba`): the challenger is judged on exactly the bytes that will
ship, and a champion made by any trainer can be compared with a challenger from any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

from training.config import GateConfig

# Accuracies are ratios of small counts; compare with a little slack so that a challenger that
# ties exactly is not rejected by float rounding in "champion - max_drop".
_EPS = 1e-9
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: sum over confidence bins of |accuracy - mean confidence| weighted by bin share."""
    proba = np.asarray(proba, dtype=np.float64)
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(float(correct[mask].mean()) - float(conf[mask].mean()))
    return float(ece)


def roc_auc_ovr(proba: np.ndarray, y: np.ndarray, n_classes: int) -> float | None:
    """One-vs-rest ROC-AUC, macro-averaged over the classes present with both outcomes."""
    aucs = []
    for c in range(n_classes):
        positives = y == c
        if positives.any() and not positives.all():
            aucs.append(float(roc_auc_score(positives, np.asarray(proba)[:, c])))
    return float(np.mean(aucs)) if aucs else None


def per_class(proba: np.ndarray, y: np.ndarray, n_classes: int) -> list[dict[str, Any]]:
    """Precision, recall and support of each class index (precision is None when never
    predicted, recall None when absent)."""
    pred = np.asarray(proba).argmax(axis=1)
    labels = list(range(n_classes))
    precision, recall, _, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    predicted = np.bincount(pred, minlength=n_classes)
    return [
        {
            "precision": float(precision[c]) if predicted[c] else None,
            "recall": float(recall[c]) if support[c] else None,
            "support": int(support[c]),
        }
        for c in labels
    ]


def score(proba: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float | None]:
    """Accuracy and macro F1 of probabilities ``proba`` [n, n_classes] against labels ``y``.

    Returns ``{"accuracy": None, "macro_f1": None}`` for an empty set.
    """
    if len(y) == 0:
        return {"accuracy": None, "macro_f1": None}
    pred = np.asarray(proba).argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(
            f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0)
        ),
    }


def full_score(proba: np.ndarray | None, y: np.ndarray, n_classes: int) -> dict[str, Any]:
    """:func:`score` plus ROC-AUC (one-vs-rest, macro), ECE and per-class precision/recall."""
    if proba is None or len(y) == 0:
        return {
            "accuracy": None,
            "macro_f1": None,
            "roc_auc": None,
            "ece": None,
            "per_class": [],
        }
    return {
        **score(proba, y, n_classes),
        "roc_auc": roc_auc_ovr(proba, y, n_classes),
        "ece": expected_calibration_error(proba, y),
        "per_class": per_class(proba, y, n_classes),
    }


def model_metrics(
    golden_proba: np.ndarray,
    y_golden: np.ndarray,
    field_proba: np.ndarray | None,
    y_field: np.ndarray,
    n_classes: int,
) -> dict[str, Any]:
    """The metrics block of one model in the report.

    Keys, for each set ``golden`` and ``field``: ``<set>_accuracy``, ``<set>_macro_f1``,
    ``<set>_roc_auc`` (one-vs-rest, macro), ``<set>_ece`` (15 bins), ``<set>_per_class`` (list
    of ``{precision, recall, support}`` by class index) and ``<set>_count``. The field values are
    None (and the per-class list empty) when there is no field set.
    """
    if field_proba is None:
        y_field = y_field[:0]
    out: dict[str, Any] = {}
    for name, proba, y in (("golden", golden_proba, y_golden), ("field", field_proba, y_field)):
        s = full_score(proba, y, n_classes)
        out.update({f"{name}_{k}": v for k, v in s.items()})
        out[f"{name}_count"] = len(y)
    return out


def gate(
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    max_golden_drop: float,
    min_field_gain: float,
) -> tuple[bool, str]:
    """Decide whether the challenger may replace the champion.

    Rules: with no champion the challenger passes (initial model). Otherwise it is rejected if its
    golden accuracy is below ``champion - max_golden_drop`` (it forgot what it knew), or, when a
    field set exists, if its field accuracy is below ``champion + min_field_gain`` (it did not
    learn what the devices see now).

    Returns:
        ``(passed, reason)``; the reason states the numbers compared.
    """
    if champion is None:
        return True, "initial model (no champion)"
    cg, pg = challenger["golden_accuracy"], champion["golden_accuracy"]
    golden_floor = pg - max_golden_drop
    golden_msg = (
        f"golden accuracy {cg:.4f} vs champion {pg:.4f} (floor {golden_floor:.4f}, "
        f"max drop {max_golden_drop:g})"
    )
    if cg < golden_floor - _EPS:
        return False, f"rejected: {golden_msg}"
    cf, pf = challenger.get("field_accuracy"), champion.get("field_accuracy")
    if cf is None or pf is None:
        return True, f"passed: {golden_msg}; no field set to compare"
    field_bar = pf + min_field_gain
    field_msg = (
        f"field accuracy {cf:.4f} vs champion {pf:.4f} (needs >= {field_bar:.4f}, "
        f"min gain {min_field_gain:g}, n={challenger.get('field_count')})"
    )
    if cf < field_bar - _EPS:
        return False, f"rejected: {field_msg}; {golden_msg}"
    return True, f"passed: {golden_msg}; {field_msg}"


@dataclass(frozen=True)
class GateResult:
    """The verdict, its one-line reason, and every check made (for the stored report)."""

    passed: bool
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "checks": self.checks}


def _check(
    checks: list[dict[str, Any]], name: str, challenger: float, champion: float, bound: float
) -> None:
    """Record "challenger must not fall below champion - bound" (bound may be negative)."""
    floor = champion - bound
    checks.append(
        {
            "check": name,
            "challenger": challenger,
            "champion": champion,
            "floor": floor,
            "passed": challenger >= floor - _EPS,
        }
    )


def evaluate_gate(
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    bounds: GateConfig,
    labels: tuple[str, ...] | list[str] | None = None,
) -> GateResult:
    """The full champion/challenger gate.

    Overall rules (:func:`gate`): golden accuracy drop and field accuracy gain; then golden
    macro-F1 drop, and golden ECE rise. Per class, on golden and on field: recall and precision
    may not fall by more than their bound, judged only for classes with at least
    ``bounds.min_class_count`` examples in that set (smaller classes are listed as skipped, so a
    3-sample class cannot veto a model by chance).

    Returns:
        A :class:`GateResult`; its reason names every failed check with the numbers.
    """
    if champion is None:
        return GateResult(True, "initial model (no champion)", [])
    passed, reason = gate(challenger, champion, bounds.max_golden_drop, bounds.min_field_gain)
    checks: list[dict[str, Any]] = [{"check": "accuracy", "passed": passed, "detail": reason}]
    failures = [] if passed else [reason.removeprefix("rejected: ")]
    names = list(labels) if labels else None

    cf1, pf1 = challenger.get("golden_macro_f1"), champion.get("golden_macro_f1")
    if cf1 is not None and pf1 is not None:
        _check(checks, "golden macro F1", cf1, pf1, bounds.max_macro_f1_drop)
    ce, pe = challenger.get("golden_ece"), champion.get("golden_ece")
    if ce is not None and pe is not None:
        # Lower is better: "-ece must not fall below -champion_ece - bound".
        checks.append(
            {
                "check": "golden ECE",
                "challenger": ce,
                "champion": pe,
                "ceiling": pe + bounds.max_ece_increase,
                "passed": ce <= pe + bounds.max_ece_increase + _EPS,
            }
        )
    for where in ("golden", "field"):
        mine = challenger.get(f"{where}_per_class") or []
        theirs = champion.get(f"{where}_per_class") or []
        for c, (a, b) in enumerate(zip(mine, theirs, strict=False)):
            label = names[c] if names and c < len(names) else str(c)
            support = int(a.get("support") or 0)
            if support < bounds.min_class_count:
                if support:
                    checks.append(
                        {
                            "check": f"{where} class {label!r}",
                            "passed": True,
                            "skipped": f"{support} examples < min_class_count "
                            f"{bounds.min_class_count}",
                        }
                    )
                continue
            for metric, bound in (
                ("recall", bounds.max_class_recall_drop),
                ("precision", bounds.max_class_precision_drop),
            ):
                va, vb = a.get(metric), b.get(metric)
                if va is None and vb is None:
                    continue
                _check(
                    checks,
                    f"{where} {metric} of class {label!r} (n={support})",
                    float(va or 0.0),
                    float(vb or 0.0),
                    bound,
                )
    for chk in checks[1:]:
        if not chk["passed"]:
            if "ceiling" in chk:
                failures.append(
                    f"{chk['check']} {chk['challenger']:.4f} vs champion {chk['champion']:.4f} "
                    f"(ceiling {chk['ceiling']:.4f})"
                )
            else:
                failures.append(
                    f"{chk['check']} {chk['challenger']:.4f} vs champion {chk['champion']:.4f} "
                    f"(floor {chk['floor']:.4f})"
                )
    if failures:
        return GateResult(False, "rejected: " + "; ".join(failures), checks)
    skipped = sum(1 for c in checks if "skipped" in c)
    note = (
        f"; {skipped} per-class check(s) skipped (fewer than {bounds.min_class_count} examples)"
        if skipped
        else ""
    )
    return GateResult(True, f"{reason}; {len(checks) - skipped} checks passed{note}", checks)


__all__ = [
    "ECE_BINS",
    "GateResult",
    "evaluate_gate",
    "expected_calibration_error",
    "full_score",
    "gate",
    "model_metrics",
    "per_class",
    "roc_auc_ovr",
    "score",
]
