"""Spec validation: every field is checked, and errors name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.training_testkit import spec_dict
from training.errors import SpecError
from training.spec import GateSpec, JobSpec, load_spec


def test_valid_spec_loads(write_spec, tmp_path):
    champion = tmp_path / "champ.onnx"
    champion.write_bytes(b"x")
    samples = tmp_path / "s.npz"
    samples.write_bytes(b"x")
    spec = load_spec(
        write_spec(
            trainer="torch-cnn",
            hyperparams={"epochs": 3},
            champion={"version": 2, "onnx_path": str(champion)},
            samples_path=str(samples),
            seed=42,
        )
    )
    assert spec.trainer == "torch-cnn"
    assert spec.hyperparams == {"epochs": 3}
    assert spec.champion is not None and spec.champion.version == 2
    assert spec.samples_path == samples
    assert spec.gate == GateSpec(0.03, 0.0)
    assert spec.input_spec.shape == (-1, 64)
    assert spec.labels == tuple(str(i) for i in range(10))


def test_optional_keys_may_be_omitted(tmp_path):
    doc = spec_dict(tmp_path)
    for key in ("hyperparams", "samples_path", "champion"):
        del doc[key]
    spec = JobSpec.from_dict(doc)
    assert spec.hyperparams == {} and spec.samples_path is None and spec.champion is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"job_id": "7"}, "job_id must be an integer"),
        ({"job_id": True}, "job_id must be an integer"),
        ({"model_line": "bad line!"}, "model_line must match"),
        ({"trainer": "xgboost"}, "unknown trainer 'xgboost'"),
        ({"hyperparams": {"epochz": 3}}, r"unknown hyperparameter\(s\) \['epochz'\]"),
        ({"hyperparams": {"max_iter": "many"}}, "hyperparams.max_iter must be an integer"),
        ({"hyperparams": {"max_iter": 0}}, "hyperparams.max_iter must be >= 1"),
        ({"hyperparams": {"hidden_layer_sizes": []}}, "hidden_layer_sizes must be a non-empty"),
        ({"hyperparams": [1]}, "hyperparams must be an object"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 2**40}, "seed must be >= 0 and <= 4294967295"),
        ({"samples_path": "/nonexistent/s.npz"}, "samples_path '/nonexistent/s.npz' is not a file"),
        ({"samples_path": 5}, "samples_path must be a non-empty path string"),
        ({"champion": {"version": 1}}, "champion needs both"),
        ({"champion": {"version": 0, "onnx_path": "/x"}}, "champion.version must be >= 1"),
        ({"champion": {"version": 1, "onnx_path": "/nope.onnx"}}, "champion.onnx_path"),
        ({"champion": "v1"}, "champion must be an object"),
        ({"gate": {"max_golden_drop": 0.03}}, "gate.min_field_gain is required"),
        ({"gate": {"max_golden_drop": 2, "min_field_gain": 0}}, "gate.max_golden_drop must be"),
        ({"gate": {"max_golden_drop": 0.1, "min_field_gain": 0, "x": 1}}, "unknown gate key"),
        ({"input_spec": {"name": "input"}}, "invalid input_spec"),
        ({"labels": ["0", "0"]}, "labels must be a list of >= 2 distinct"),
        ({"labels": "0123456789"}, "labels must be a list"),
        ({"output_dir": ""}, "output_dir must be a non-empty path string"),
        ({"hyperparameters": {}}, r"unknown spec key\(s\) \['hyperparameters'\]"),
    ],
)
def test_invalid_fields_are_refused(tmp_path, overrides, message):
    with pytest.raises(SpecError, match=message):
        JobSpec.from_dict(spec_dict(tmp_path, **overrides))


def test_missing_required_key(tmp_path):
    doc = spec_dict(tmp_path)
    del doc["seed"], doc["labels"]
    with pytest.raises(SpecError, match=r"missing required key\(s\) \['labels', 'seed'\]"):
        JobSpec.from_dict(doc)


def test_not_an_object(tmp_path):
    with pytest.raises(SpecError, match="must be a JSON object"):
        JobSpec.from_dict([1, 2])


def test_unreadable_or_malformed_file(tmp_path: Path):
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"job_id": 1,')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(bad)
    nan = tmp_path / "nan.json"
    doc = spec_dict(tmp_path)
    doc["gate"] = {"max_golden_drop": float("nan"), "min_field_gain": 0.0}
    nan.write_text(json.dumps(doc))
    with pytest.raises(SpecError, match="gate.max_golden_drop"):
        load_spec(nan)
