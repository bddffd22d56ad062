"""Trainers: seeded and reproducible, hyperparameters checked, torch global state left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.training_testkit import FAST_CNN
from training.data import digits_pools
from training.errors import SpecError, TrainingError
from training.trainers import TRAINERS, get_trainer, train


@pytest.mark.parametrize(
    ("name", "hp"), [("sklearn-mlp", {"max_iter": 200}), ("torch-cnn", FAST_CNN)]
)
def test_same_data_and_seed_give_the_same_model(name, hp):
    pools = digits_pools()
    X, y, G = pools.train.X, pools.train.y, pools.golden.X
    a, _ = train(name, X, y, n_classes=10, seed=5, hyperparams=hp)
    b, _ = train(name, X, y, n_classes=10, seed=5, hyperparams=hp)
    np.testing.assert_array_equal(a.predict_proba(G), b.predict_proba(G))
    assert a.to_onnx() == b.to_onnx()

    c, _ = train(name, X, y, n_classes=10, seed=6, hyperparams=hp)
    assert not np.array_equal(a.predict_proba(G), c.predict_proba(G))


def test_torch_training_restores_global_state():
    pools = digits_pools()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    train(
        "torch-cnn",
        pools.train.X[:200],
        pools.train.y[:200],
        n_classes=10,
        seed=0,
        hyperparams={"epochs": 1},
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det


def test_hyperparams_override_defaults():
    pools = digits_pools()
    model, hp = train(
        "sklearn-mlp",
        pools.train.X,
        pools.train.y,
        n_classes=10,
        seed=0,
        hyperparams={"hidden_layer_sizes": [16], "max_iter": 50},
    )
    assert hp["hidden_layer_sizes"] == [16] and hp["max_iter"] == 50
    assert hp["alpha"] == 1e-4  # untouched default is reported too
    assert model.estimator.coefs_[0].shape == (64, 16)


def test_effective_hyperparams_are_json_friendly():
    for name, trainer in TRAINERS.items():
        hp = trainer.resolve({})
        assert all(isinstance(v, int | float | str | list) for v in hp.values()), name
    assert get_trainer("torch-cnn").resolve({"lr": 1})["lr"] == 1.0


def test_unknown_trainer_and_hyperparams():
    with pytest.raises(SpecError, match="unknown trainer"):
        get_trainer("svm")
    with pytest.raises(SpecError, match=r"unknown hyperparameter\(s\) \['C'\]"):
        get_trainer("sklearn-mlp").resolve({"C": 1.0})
    with pytest.raises(SpecError, match="hyperparams.lr must be a number"):
        get_trainer("torch-cnn").resolve({"lr": "fast"})


def test_a_missing_class_is_refused():
    pools = digits_pools()
    keep = pools.train.y != 3
    with pytest.raises(TrainingError, match=r"no example of class index\(es\) \[3\]"):
        train("sklearn-logreg", pools.train.X[keep], pools.train.y[keep], n_classes=10, seed=0)
