"""The job end to end: in-process ``run_job`` and the ``python -m training`` subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from contract import OUTPUT_NAME
from tests.training.training_testkit import FAST_CNN, make_samples, spec_dict, write_samples
from training.data import digits_pools
from training.errors import ChampionError, SpecError
from training.export import onnx_predict_proba, read_metadata
from training.pipeline import run_job
from training.spec import JobSpec

REPORT_KEYS = {
    "passed",
    "reason",
    "dataset_version",
    "dataset",
    "metrics",
    "parity",
    "trainer",
    "hyperparams",
    "seed",
    "train_seconds",
    "job_id",
    "model_line",
    "champion_version",
    "model_sha256",
    "model_size",
    "opset",
    "gate",
    "warm_start",
    "reproducibility",
    "weights_sha256",
}


def _samples_file(tmp_path: Path, n: int = 150) -> Path:
    field = digits_pools().field
    return write_samples(tmp_path / "samples.npz", make_samples(field.X[:n], field.y[:n]))


def _run_cli(spec_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", "--spec", str(spec_path), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_cli_end_to_end_writes_model_report_and_dataset(write_spec, tmp_path, champion_path):
    spec_path = write_spec(
        job_id=41,
        samples_path=str(_samples_file(tmp_path)),
        champion={"version": 3, "onnx_path": str(champion_path)},
        hyperparams={"max_iter": 300},
    )
    out = Path(json.loads(spec_path.read_text())["output_dir"])
    proc = _run_cli(spec_path, "--print")
    assert proc.returncode == 0, proc.stderr

    report = json.loads((out / "report.json").read_text())
    assert json.loads(proc.stdout) == report
    assert set(report) == REPORT_KEYS
    assert set(report["dataset"]) >= {
        "base",
        "base_count",
        "sample_count",
        "train_count",
        "field_eval_count",
    }
    assert report["dataset"]["base_count"] == 1000 and report["dataset"]["sample_count"] == 150
    assert report["trainer"] == "sklearn-mlp" and report["hyperparams"]["max_iter"] == 300
    assert report["champion_version"] == 3 and report["job_id"] == 41
    assert isinstance(report["passed"], bool) and report["reason"]
    for who in ("challenger", "champion"):
        assert 0.8 < report["metrics"][who]["golden_accuracy"] <= 1.0
        assert report["metrics"][who]["field_accuracy"] is not None
    assert set(report["parity"]) >= {"argmax_agreement", "max_abs_diff", "passed"}
    assert report["train_seconds"] > 0

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["dataset_version"] == report["dataset_version"]
    assert len(dataset["samples"]["train_ids"]) + len(dataset["samples"]["field_ids"]) == 150

    raw = (out / "model.onnx").read_bytes()
    meta = read_metadata(raw)
    assert meta["dataset_version"] == report["dataset_version"]
    assert meta["trainer"] == "sklearn-mlp"
    assert meta["seed"] == "0" and meta["job_id"] == "41" and meta["model_line"] == "digits"
    assert [o.name for o in onnx.load_from_string(raw).graph.output] == [OUTPUT_NAME]
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files


def test_cli_initial_training_with_torch_cnn(write_spec):
    spec_path = write_spec(trainer="torch-cnn", hyperparams=FAST_CNN, samples_path=None)
    proc = _run_cli(spec_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    out = Path(json.loads(spec_path.read_text())["output_dir"])
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["reason"] == "initial model (no champion)"
    assert report["metrics"]["champion"] is None
    assert report["metrics"]["challenger"]["field_accuracy"] is None
    assert report["dataset"]["sample_count"] == 0 and report["dataset"]["field_eval_count"] == 0


def test_cli_refuses_a_malformed_spec(tmp_path, write_spec):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = _run_cli(bad)
    assert proc.returncode == 2
    assert "invalid spec" in proc.stderr and "not valid JSON" in proc.stderr

    proc = _run_cli(write_spec(trainer="svm"))
    assert proc.returncode == 2
    assert "unknown trainer 'svm'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reports_a_broken_samples_file(tmp_path, write_spec):
    broken = tmp_path / "broken.npz"
    np.savez(broken, X=np.zeros((2, 64), np.float32))
    spec_path = write_spec(samples_path=str(broken))
    proc = _run_cli(spec_path)
    assert proc.returncode == 1
    assert "SampleError" in proc.stderr and "missing array" in proc.stderr
    out = Path(json.loads(spec_path.read_text())["output_dir"])
    assert not (out / "report.json").exists()


@pytest.mark.parametrize(("trainer", "hp"), [("sklearn-mlp", {}), ("torch-cnn", FAST_CNN)])
def test_same_dataset_and_seed_reproduce_the_same_metrics(tmp_path, trainer, hp):
    samples = _samples_file(tmp_path)
    reports = [
        run_job(
            JobSpec.from_dict(
                spec_dict(
                    tmp_path / f"run{i}", trainer=trainer, hyperparams=hp, samples_path=str(samples)
                )
            )
        )
        for i in range(2)
    ]
    a, b = reports
    assert a.dataset_version == b.dataset_version
    assert a.metrics == b.metrics
    assert a.parity == b.parity
    assert a.model_sha256 == b.model_sha256
    # The record says so: same dataset version and config hash, same metrics hash.
    assert a.reproducibility == b.reproducibility
    assert a.reproducibility["dataset_version"] == a.dataset_version


def test_any_trainer_can_be_champion(tmp_path, champion_path):
    """A torch challenger against the sklearn champion: both run through ONNX Runtime."""
    spec = JobSpec.from_dict(
        spec_dict(
            tmp_path / "out",
            trainer="sklearn-logreg",
            samples_path=str(_samples_file(tmp_path)),
            champion={"version": 1, "onnx_path": str(champion_path)},
        )
    )
    report = run_job(spec)
    assert report.metrics["champion"]["golden_accuracy"] > 0.9
    golden = digits_pools().golden
    proba = onnx_predict_proba((tmp_path / "out" / "model.onnx").read_bytes(), golden.X)
    assert report.metrics["challenger"]["golden_accuracy"] == pytest.approx(
        float((proba.argmax(1) == golden.y).mean())
    )


def test_a_champion_that_cannot_run_is_an_error(tmp_path):
    junk = tmp_path / "champ.onnx"
    junk.write_bytes(b"not onnx")
    spec = JobSpec.from_dict(
        spec_dict(tmp_path / "out", champion={"version": 1, "onnx_path": str(junk)})
    )
    with pytest.raises(ChampionError, match="champion v1"):
        run_job(spec)


def test_spec_that_does_not_fit_the_base_data(tmp_path):
    spec = JobSpec.from_dict(spec_dict(tmp_path / "out", labels=["a", "b"]))
    with pytest.raises(SpecError, match="labels must be"):
        run_job(spec)
    wide = {"name": "input", "shape": [-1, 128], "dtype": "float32", "min": 0.0, "max": 1.0}
    with pytest.raises(SpecError, match=r"float32 \[-1, 64\]"):
        run_job(JobSpec.from_dict(spec_dict(tmp_path / "out", input_spec=wide)))
