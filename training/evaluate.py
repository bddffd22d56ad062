"""Metrics and the champion/challenger gate (pure: predictions in, numbers and a verdict out).

Both models are scored from the probabilities ONNX Runtime computes from their ONNX files (see
:func:`training.export.onnx_predict_proba`): the challenger is judged on exactly the bytes that will
ship, and a champion made by any trainer can be compared with a challenger from any other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

# Accuracies are ratios of small counts; compare with a little slack so that a challenger that
# ties exactly is not rejected by float rounding in "champion - max_drop".
_EPS = 1e-9


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


def model_metrics(
    golden_proba: np.ndarray,
    y_golden: np.ndarray,
    field_proba: np.ndarray | None,
    y_field: np.ndarray,
    n_classes: int,
) -> dict[str, Any]:
    """The metrics block of one model in the report.

    Keys: ``golden_accuracy``, ``golden_macro_f1``, ``golden_count``, ``field_accuracy``,
    ``field_macro_f1``, ``field_count`` (the field values are None when there is no field set).
    """
    golden = score(golden_proba, y_golden, n_classes)
    if field_proba is None:
        field_proba, y_field = np.zeros((0, n_classes)), y_field[:0]
    field = score(field_proba, y_field, n_classes)
    return {
        "golden_accuracy": golden["accuracy"],
        "golden_macro_f1": golden["macro_f1"],
        "golden_count": len(y_golden),
        "field_accuracy": field["accuracy"],
        "field_macro_f1": field["macro_f1"],
        "field_count": len(y_field),
    }


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


__all__ = ["gate", "model_metrics", "score"]
