"""Trainer registry: a name in the job spec -> defaults, hyperparameter schema and a fit function.

A trainer turns ``(X, y)`` into a :class:`FittedModel`: something that predicts class
probabilities in its own framework (for the parity check) and exports itself to ONNX bytes. Torch
and skl2onnx are imported lazily, so loading a spec does not pay for them.

Hyperparameters from the spec override the trainer's defaults; an unknown name or a value of the
wrong kind is a :class:`~training.errors.SpecError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from training.errors import SpecError, TrainingError


class FittedModel(Protocol):
    """A trained challenger, as the pipeline sees it."""

    warm_started: bool  # True when training started from the champion's weights

    def state(self) -> dict[str, np.ndarray]:
        """The framework weights, by name (saved as ``weights.npz`` for a later warm start)."""
        ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities float [n, n_classes] computed by the training framework."""
        ...

    def to_onnx(self, *, input_name: str = "input") -> bytes:
        """Self-contained ONNX model: input ``input_name`` float32 [N, *sample_shape], output
        probabilities."""
        ...


@dataclass(frozen=True)
class FitContext:
    """What a trainer needs besides the data and hyperparameters."""

    sample_shape: tuple[int, ...]  # one sample's shape from the input spec (batch excluded)
    init: dict[str, np.ndarray] | None = None  # the champion's weights, for a warm start


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its kind fixes how a JSON value is checked and normalised."""

    kind: str  # "int", "float", "int_list" or a "choice:a|b|c" list of allowed strings
    default: Any
    minimum: float | None = None  # inclusive lower bound for numbers and list items

    def coerce(self, name: str, value: Any) -> Any:
        """Check ``value`` against this parameter and return its normalised JSON-friendly form."""
        where = f"hyperparams.{name}"
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{where} must be an integer, got {value!r}")
            self._check_min(where, value)
            return value
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SpecError(f"{where} must be a number, got {value!r}")
            if not np.isfinite(value):
                raise SpecError(f"{where} must be finite, got {value!r}")
            self._check_min(where, value)
            return float(value)
        if self.kind == "int_list":
            if not isinstance(value, list | tuple) or not value:
                raise SpecError(f"{where} must be a non-empty list of integers, got {value!r}")
            for item in value:
                if isinstance(item, bool) or not isinstance(item, int):
                    raise SpecError(f"{where} must be a list of integers, got {value!r}")
                self._check_min(where, item)
            return list(value)
        if self.kind.startswith("choice:"):
            allowed = self.kind.removeprefix("choice:").split("|")
            if value not in allowed:
                raise SpecError(f"{where} must be one of {allowed}, got {value!r}")
            return value
        raise AssertionError(f"unknown parameter kind {self.kind!r}")  # a bug in the registry

    def _check_min(self, where: str, value: float) -> None:
        if self.minimum is not None and value < self.minimum:
            raise SpecError(f"{where} must be >= {self.minimum:g}, got {value!r}")


FitFn = Callable[[np.ndarray, np.ndarray, int, int, dict[str, Any], FitContext], FittedModel]


@dataclass(frozen=True)
class Trainer:
    """A registered trainer: ``fit(X, y, n_classes, seed, hyperparams, context)``."""

    name: str
    params: Mapping[str, Param]
    fit: FitFn
    description: str = ""

    def resolve(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``overrides``, each value checked.

        Raises:
            SpecError: an unknown hyperparameter name or a bad value.
        """
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise SpecError(
                f"unknown hyperparameter(s) {unknown} for trainer {self.name!r}; "
                f"known: {sorted(self.params)}"
            )
        out = {name: p.coerce(name, p.default) for name, p in self.params.items()}
        for name, value in overrides.items():
            out[name] = self.params[name].coerce(name, value)
        return out


# --- scikit-learn -------------------------------------------------------------------------------


@dataclass
class SklearnModel:
    """A fitted scikit-learn classifier; exported with skl2onnx."""

    estimator: Any
    n_features: int
    warm_started: bool = False

    def state(self) -> dict[str, np.ndarray]:
        est = self.estimator
        if hasattr(est, "coefs_"):
            out = {f"coef_{i}": np.asarray(c) for i, c in enumerate(est.coefs_)}
            out.update({f"intercept_{i}": np.asarray(b) for i, b in enumerate(est.intercepts_)})
            return out
        return {"coef": np.asarray(est.coef_), "intercept": np.asarray(est.intercept_)}

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict_proba(np.asarray(X, dtype=np.float32)))

    def to_onnx(self, *, input_name: str = "input") -> bytes:
        from training.export import sklearn_to_onnx

        return sklearn_to_onnx(self.estimator, n_features=self.n_features, input_name=input_name)


def _check_classes(y: np.ndarray, n_classes: int) -> None:
    # A classifier only learns the classes it sees; a missing class would shift the output
    # columns away from the spec's labels, so refuse rather than ship a mislabelled model.
    missing = sorted(set(range(n_classes)) - {int(v) for v in np.unique(y)})
    if missing:
        raise TrainingError(f"training data has no example of class index(es) {missing}")


def _check_flat(ctx: FitContext) -> None:
    if len(ctx.sample_shape) != 1:
        raise SpecError(
            f"scikit-learn trainers need a flat input_spec [-1, F], got sample shape "
            f"{list(ctx.sample_shape)}; use torch-cnn or torch-mobilenet for images"
        )


def _shapes_match(init: dict[str, np.ndarray] | None, want: dict[str, tuple[int, ...]]) -> bool:
    """True when ``init`` holds exactly the arrays ``want`` names, with those shapes."""
    if not init or set(init) != set(want):
        return False
    return all(tuple(init[k].shape) == v for k, v in want.items())


def _fit_sklearn(
    estimator: Any, X: np.ndarray, y: np.ndarray, n_classes: int, *, warm: bool = False
) -> SklearnModel:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Hitting max_iter is a tuning matter the gate judges by accuracy, not a job failure.
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(np.asarray(X, dtype=np.float32), y)
    return SklearnModel(estimator, n_features=int(X.shape[1]), warm_started=warm)


def _fit_mlp(
    X: np.ndarray, y: np.ndarray, n_classes: int, seed: int, hp: dict[str, Any], ctx: FitContext
) -> FittedModel:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    _check_flat(ctx)
    _check_classes(y, n_classes)
    hidden = tuple(hp["hidden_layer_sizes"])
    units = [int(X.shape[1]), *hidden, n_classes]
    want: dict[str, tuple[int, ...]] = {
        f"coef_{i}": (units[i], units[i + 1]) for i in range(len(units) - 1)
    }
    want.update({f"intercept_{i}": (units[i + 1],) for i in range(len(units) - 1)})
    warm = _shapes_match(ctx.init, want)
    est = MLPClassifier(
        hidden_layer_sizes=hidden,
        alpha=hp["alpha"],
        learning_rate_init=hp["learning_rate_init"],
        max_iter=hp["max_iter"],
        tol=hp["tol"],
        n_iter_no_change=hp["n_iter_no_change"],
        random_state=seed,
    )
    if warm:
        assert ctx.init is not None
        # One incremental step on one example per class builds the estimator's structure; the
        # champion's weights then replace the initial ones and fit() continues from them.
        rows = [int(np.flatnonzero(y == c)[0]) for c in range(n_classes)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.partial_fit(
                np.asarray(X[rows], dtype=np.float32), y[rows], classes=np.arange(n_classes)
            )
        est.set_params(warm_start=True)
        est.coefs_ = [np.array(ctx.init[f"coef_{i}"]) for i in range(len(units) - 1)]
        est.intercepts_ = [np.array(ctx.init[f"intercept_{i}"]) for i in range(len(units) - 1)]
    return _fit_sklearn(est, X, y, n_classes, warm=warm)


def _fit_logreg(
    X: np.ndarray, y: np.ndarray, n_classes: int, seed: int, hp: dict[str, Any], ctx: FitContext
) -> FittedModel:
    from sklearn.linear_model import LogisticRegression

    _check_flat(ctx)
    _check_classes(y, n_classes)
    n_features = int(X.shape[1])
    warm = _shapes_match(ctx.init, {"coef": (n_classes, n_features), "intercept": (n_classes,)})
    est = LogisticRegression(
        C=hp["C"], max_iter=hp["max_iter"], tol=hp["tol"], random_state=seed, warm_start=warm
    )
    if warm:
        assert ctx.init is not None
        est.coef_ = np.array(ctx.init["coef"])
        est.intercept_ = np.array(ctx.init["intercept"])
    return _fit_sklearn(est, X, y, n_classes, warm=warm)


def _fit_torch_cnn(
    X: np.ndarray, y: np.ndarray, n_classes: int, seed: int, hp: dict[str, Any], ctx: FitContext
) -> FittedModel:
    from training.torch_cnn import fit_cnn

    _check_classes(y, n_classes)
    return fit_cnn(
        X, y, n_classes=n_classes, seed=seed, sample_shape=ctx.sample_shape, init=ctx.init, **hp
    )


def _fit_torch_mobilenet(
    X: np.ndarray, y: np.ndarray, n_classes: int, seed: int, hp: dict[str, Any], ctx: FitContext
) -> FittedModel:
    from training.torch_cnn import fit_mobilenet

    _check_classes(y, n_classes)
    return fit_mobilenet(
        X, y, n_classes=n_classes, seed=seed, sample_shape=ctx.sample_shape, init=ctx.init, **hp
    )


TRAINERS: dict[str, Trainer] = {
    t.name: t
    for t in (
        Trainer(
            "sklearn-mlp",
            {
                "hidden_layer_sizes": Param("int_list", [64], minimum=1),
                "alpha": Param("float", 1e-4, minimum=0.0),
                "learning_rate_init": Param("float", 1e-3, minimum=1e-8),
                "max_iter": Param("int", 600, minimum=1),
                "tol": Param("float", 1e-4, minimum=0.0),
                # sklearn's default of 10 stalled epochs stops some drifted datasets early and
                # costs up to 4 points of golden accuracy (measured); 50 is stable.
                "n_iter_no_change": Param("int", 50, minimum=1),
            },
            _fit_mlp,
            "scikit-learn MLPClassifier (Adam)",
        ),
        Trainer(
            "sklearn-logreg",
            {
                "C": Param("float", 1.0, minimum=1e-12),
                "max_iter": Param("int", 1000, minimum=1),
                "tol": Param("float", 1e-4, minimum=0.0),
            },
            _fit_logreg,
            "scikit-learn multinomial LogisticRegression (lbfgs)",
        ),
        Trainer(
            "torch-cnn",
            {
                "epochs": Param("int", 30, minimum=1),
                "batch_size": Param("int", 64, minimum=1),
                "lr": Param("float", 1e-3, minimum=1e-8),
                "weight_decay": Param("float", 0.0, minimum=0.0),
                "channels": Param("int_list", [16, 32], minimum=1),
                "hidden": Param("int", 64, minimum=1),
                "threads": Param("int", 1, minimum=1),  # measured: 2 buys nothing here
            },
            _fit_torch_cnn,
            "small CNN on the input image, softmax output, deterministic on CPU",
        ),
        Trainer(
            "torch-mobilenet",
            {
                "epochs": Param("int", 5, minimum=1),
                "batch_size": Param("int", 32, minimum=2),
                "lr": Param("float", 1e-3, minimum=1e-8),
                "weight_decay": Param("float", 0.0, minimum=0.0),
                "dropout": Param("float", 0.2, minimum=0.0),
                "threads": Param("int", 2, minimum=1),
                "max_steps": Param("int", 0, minimum=0),  # 0: train every epoch in full
            },
            _fit_torch_mobilenet,
            "torchvision mobilenet_v3_small from scratch (ImageFolder data), softmax output",
        ),
    )
}


def get_trainer(name: str) -> Trainer:
    """The registered trainer called ``name``.

    Raises:
        SpecError: no trainer has that name.
    """
    try:
        return TRAINERS[name]
    except KeyError:
        raise SpecError(f"unknown trainer {name!r}; known: {sorted(TRAINERS)}") from None


def train(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    seed: int,
    hyperparams: Mapping[str, Any] | None = None,
    sample_shape: tuple[int, ...] | None = None,
    init: dict[str, np.ndarray] | None = None,
) -> tuple[FittedModel, dict[str, Any]]:
    """Fit trainer ``name`` on ``(X, y)``; returns the model and the effective hyperparameters.

    Args:
        sample_shape: one sample's shape in the model input (default: flat ``(F,)``).
        init: the champion's weights; used (``model.warm_started``) when they fit the model.

    Raises:
        SpecError: unknown trainer or hyperparameter, or an input shape the trainer cannot take.
        TrainingError: the data cannot be trained on (e.g. a class has no example).
    """
    trainer = get_trainer(name)
    hp = trainer.resolve(hyperparams or {})
    ctx = FitContext(sample_shape or (int(X.shape[1]),), init)
    return trainer.fit(X, y, n_classes, seed, hp, ctx), hp


__all__ = [
    "TRAINERS",
    "FitContext",
    "FittedModel",
    "Param",
    "SklearnModel",
    "Trainer",
    "get_trainer",
    "train",
]
