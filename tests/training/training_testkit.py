"""Helpers shared by the training tests (imported by name: pytest's rootdir import mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.data import LABELS
from training.samples import Samples, write_samples  # noqa: F401 - tests import it from here

# The torch trainer's defaults take a few seconds; tests that only need *a* CNN use fewer epochs.
FAST_CNN = {"epochs": 6}


def make_samples(X: np.ndarray, y: np.ndarray, prefix: str = "s", n_devices: int = 5) -> Samples:
    """Samples with ids ``{prefix}00000..`` spread over ``n_devices`` devices."""
    n = len(y)
    return Samples(
        np.asarray(X, np.float32),
        np.asarray(y, np.int64),
        np.array([f"{prefix}{i:05d}" for i in range(n)]),
        np.array([f"dev-{i % n_devices}" for i in range(n)]),
    )


def spec_dict(output_dir: Path, /, **overrides: Any) -> dict[str, Any]:
    """A valid spec document for the digits line; keyword arguments replace fields."""
    doc: dict[str, Any] = {
        "job_id": 7,
        "model_line": "digits",
        "trainer": "sklearn-mlp",
        "hyperparams": {},
        "seed": 0,
        "samples_path": None,
        "champion": None,
        "gate": {"max_golden_drop": 0.03, "min_field_gain": 0.0},
        "input_spec": {
            "name": "input",
            "shape": [-1, 64],
            "dtype": "float32",
            "min": 0.0,
            "max": 1.0,
        },
        "labels": list(LABELS),
        "output_dir": str(output_dir),
    }
    doc.update(overrides)
    return doc
