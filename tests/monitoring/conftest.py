"""Fixtures for the monitoring statistics tests: the line's real first model, trained by the
training pipeline (reference embedded at export), and the field pool clean and drifted with the
simulator's torchvision drift (``training.data.drift``, what ``firmware_sim.swarm`` applies).
Built once per session: training and drifting take seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from contract.monitoring import METADATA_KEY, MonitoringReference
from tests.training.training_testkit import spec_dict
from training.data import digits_pools, drift
from training.export import onnx_predict_proba, read_metadata

SEVERITIES = (0.0, 0.25, 0.5, 1.0)  # 0: the clean field pool; 1.0: the simulator's drift


@dataclass(frozen=True)
class Trained:
    onnx: bytes
    reference: MonitoringReference


@dataclass(frozen=True)
class View:
    """The field pool as a fleet would see it at one drift severity, run through the model."""

    severity: float
    X: np.ndarray
    y: np.ndarray
    P: np.ndarray  # the model's probabilities (ONNX Runtime)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.P.argmax(axis=1) == self.y))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The digits line's first model (sklearn-mlp on the base pool), as ``run_job`` exports it."""
    from training.pipeline import run_job
    from training.spec import JobSpec

    out: Path = tmp_path_factory.mktemp("trained")
    run_job(JobSpec.from_dict(spec_dict(out)))
    raw = (out / "model.onnx").read_bytes()
    return Trained(raw, MonitoringReference.from_json(read_metadata(raw)[METADATA_KEY]))


@pytest.fixture(scope="session")
def views(trained: Trained) -> dict[float, View]:
    field = digits_pools().field
    out = {}
    for severity in SEVERITIES:
        X = drift(field.X, severity=severity, seed=1) if severity else field.X
        out[severity] = View(severity, X, field.y, onnx_predict_proba(trained.onnx, X))
    return out
