"""Fixtures for the training tests: spec documents, samples files, and a trained champion.

Everything is real (scikit-learn, torch, ONNX Runtime); the expensive pieces (drifted samples, the
champion) are built once per session.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.training.training_testkit import make_samples, spec_dict
from training.data import digits_pools, drift
from training.samples import Samples


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """``write_spec(**overrides) -> path`` of a spec.json whose output_dir is under tmp_path."""
    counter = iter(range(1000))

    def _write(**overrides: Any) -> Path:
        n = next(counter)
        overrides.setdefault("output_dir", str(tmp_path / f"out{n}"))
        path = tmp_path / f"spec{n}.json"
        path.write_text(json.dumps(spec_dict(tmp_path, **overrides)))
        return path

    return _write


@pytest.fixture(scope="session")
def drifted_samples() -> Samples:
    """The whole field pool with camera drift applied: what a knocked-askew fleet uploads."""
    field = digits_pools().field
    return make_samples(drift(field.X, severity=1.0, seed=3), field.y, prefix="drift-")


@pytest.fixture(scope="session")
def champion_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good champion: sklearn-mlp trained on the base pool only (the line's first model)."""
    from training.pipeline import run_job
    from training.spec import JobSpec

    out = tmp_path_factory.mktemp("champion")
    run_job(JobSpec.from_dict(spec_dict(out)))
    return out / "model.onnx"
