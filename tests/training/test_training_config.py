"""The line training config file: TOML and JSON, defaults, and every refusal naming its field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import GateConfig, LineConfig, load_config, parse_config
from training.errors import SpecError

TOML = """
trainer = "torch-cnn"
seed = 11
warm_start = true
field_fraction = 0.25
base = "imagefolder:/data/parts"
retrain_threshold = 500
schedule_s = 3600

[hyperparams]
epochs = 4

[gate]
max_golden_drop = 0.02
max_class_recall_drop = 0.1
min_class_count = 5
"""


def test_toml_and_json_give_the_same_config(tmp_path: Path) -> None:
    t = tmp_path / "line.toml"
    t.write_text(TOML)
    cfg = load_config(t)
    assert cfg.trainer == "torch-cnn" and cfg.hyperparams == {"epochs": 4}
    assert (cfg.seed, cfg.warm_start, cfg.field_fraction) == (11, True, 0.25)
    assert cfg.base == "imagefolder:/data/parts" and cfg.schedule_s == 3600.0
    assert cfg.gate == GateConfig(
        max_golden_drop=0.02, max_class_recall_drop=0.1, min_class_count=5
    )
    j = tmp_path / "line.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert load_config(j) == cfg


def test_everything_is_optional() -> None:
    cfg = LineConfig.from_dict({})
    assert cfg == LineConfig() and cfg.trainer == "sklearn-mlp" and cfg.base == "digits"
    assert cfg.gate.max_ece_increase == 0.05 and cfg.gate.min_class_count == 20


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"trainer": "svm"}, "unknown trainer 'svm'"),
        ({"hyperparams": {"epochz": 1}, "trainer": "torch-cnn"}, "unknown hyperparameter"),
        ({"seed": -1}, "seed must be"),
        ({"seed": True}, "seed must be"),
        ({"warm_start": "yes"}, "warm_start must be"),
        ({"field_fraction": 1.0}, "field_fraction must be"),
        ({"base": "s3://bucket"}, "base must be"),
        ({"base": "imagefolder:"}, "base must be"),
        ({"retrain_threshold": 0}, "retrain_threshold must be"),
        ({"schedule_s": 0.5}, "schedule_s must be"),
        ({"gate": {"max_golden_drop": 1.5}}, "gate.max_golden_drop must be"),
        ({"gate": {"min_field_gain": -2}}, "gate.min_field_gain must be"),
        ({"gate": {"min_class_count": 0}}, "gate.min_class_count must be"),
        ({"gate": {"max_f1_drop": 0.1}}, "unknown gate key"),
        ({"hyperparameters": {}}, "unknown training config key"),
        ([1, 2], "must be an object"),
    ],
)
def test_invalid_configs_are_refused(doc, message) -> None:
    with pytest.raises(SpecError, match=message):
        LineConfig.from_dict(doc)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"must end in \.toml or \.json"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(SpecError, match="not valid TOML"):
        parse_config("trainer = ", fmt="toml")
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_config(b"{", fmt="json")
