"""ImageFolder base data with mobilenet_v3_small and the CNN on [C, H, W] inputs; warm starts.

The image set is generated here (digits upscaled to 32x32 RGB PNGs, three classes); nothing is
downloaded, and training is cut to a few optimiser steps so each test runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.training.training_testkit import FAST_CNN, make_samples, spec_dict, write_samples
from training.data import digits_pools
from training.errors import SpecError
from training.export import onnx_predict_proba, read_metadata
from training.imagefolder import load_imagefolder
from training.pipeline import run_job
from training.spec import JobSpec

LABELS = ["zero", "one", "two"]
IMAGE_SPEC = {"name": "input", "shape": [-1, 3, 32, 32], "dtype": "float32", "min": 0.0, "max": 1.0}
FAST_MOBILENET = {"epochs": 1, "batch_size": 8, "max_steps": 4, "threads": 1}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("imagefolder")
    d = load_digits()
    counts = {("train", c): 0 for c in range(3)} | {("golden", c): 0 for c in range(3)}
    for img, label in zip(d.images, d.target, strict=True):
        if label > 2:
            continue
        split = "train" if counts[("train", label)] < 12 else "golden"
        if counts[(split, label)] >= (12 if split == "train" else 6):
            continue
        folder = root / split / LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        px = (img / 16 * 255).astype(np.uint8)
        Image.fromarray(px).resize((32, 32)).convert("RGB").save(
            folder / f"{counts[(split, label)]:03d}.png"
        )
        counts[(split, label)] += 1
    return root


def test_imagefolder_is_read_in_label_order_as_flat_chw(image_root: Path) -> None:
    train, golden = load_imagefolder(image_root, tuple(LABELS), (-1, 3, 32, 32))
    assert train.X.shape == (36, 3 * 32 * 32) and golden.X.shape == (18, 3072)
    assert train.X.dtype == np.float32 and train.X.min() >= 0.0 and train.X.max() <= 1.0
    assert np.bincount(train.y).tolist() == [12, 12, 12]
    with pytest.raises(SpecError, match="class folders"):
        load_imagefolder(image_root, ("zero", "one"), (-1, 3, 32, 32))
    with pytest.raises(SpecError, match=r"\[-1, C, H, W\]"):
        load_imagefolder(image_root, tuple(LABELS), (-1, 3072))


def test_mobilenet_on_imagefolder_exports_with_parity(tmp_path: Path, image_root: Path) -> None:
    spec = JobSpec.from_dict(
        spec_dict(
            tmp_path / "out",
            trainer="torch-mobilenet",
            hyperparams=FAST_MOBILENET,
            input_spec=IMAGE_SPEC,
            labels=LABELS,
            base=f"imagefolder:{image_root}",
        )
    )
    report = run_job(spec)
    assert report.passed, report.reason
    assert report.parity["passed"] and report.parity["argmax_agreement"] == 1.0
    assert report.parity["max_abs_diff"] <= 1e-3
    raw = (tmp_path / "out" / "model.onnx").read_bytes()
    model = onnx.load_from_string(raw)
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]  # what the agent feeds: input_spec.shape, batch of one
    assert {i.domain: i.version for i in model.opset_import}[""] == 17
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    meta = read_metadata(raw)
    assert meta["base"] == f"imagefolder:{image_root}" and meta["trainer"] == "torch-mobilenet"
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert onnx_predict_proba(raw, x).shape == (1, 3)


def test_cnn_takes_an_image_shaped_spec(tmp_path: Path, image_root: Path) -> None:
    spec = JobSpec.from_dict(
        spec_dict(
            tmp_path / "out",
            trainer="torch-cnn",
            hyperparams={"epochs": 2, "channels": [8], "hidden": 16},
            input_spec=IMAGE_SPEC,
            labels=LABELS,
            base=f"imagefolder:{image_root}",
        )
    )
    report = run_job(spec)
    assert report.parity["passed"] and report.parity["max_abs_diff"] <= 1e-3


def test_sklearn_refuses_an_image_shaped_spec(tmp_path: Path, image_root: Path) -> None:
    spec = JobSpec.from_dict(
        spec_dict(
            tmp_path / "out", input_spec=IMAGE_SPEC, labels=LABELS, base=f"imagefolder:{image_root}"
        )
    )
    with pytest.raises(SpecError, match="scikit-learn trainers need a flat input_spec"):
        run_job(spec)


@pytest.mark.parametrize(
    ("trainer", "hp"),
    [("sklearn-mlp", {"max_iter": 50}), ("sklearn-logreg", {}), ("torch-cnn", FAST_CNN)],
)
def test_warm_start_from_the_champion(tmp_path: Path, trainer: str, hp: dict) -> None:
    first = run_job(JobSpec.from_dict(spec_dict(tmp_path / "v1", trainer=trainer, hyperparams=hp)))
    assert first.weights_sha256 and (tmp_path / "v1" / "weights.npz").is_file()
    field = digits_pools().field
    samples = write_samples(tmp_path / "s.npz", make_samples(field.X[:100], field.y[:100]))
    champion = {
        "version": 1,
        "onnx_path": str(tmp_path / "v1" / "model.onnx"),
        "weights_path": str(tmp_path / "v1" / "weights.npz"),
    }
    runs = [
        run_job(
            JobSpec.from_dict(
                spec_dict(
                    tmp_path / f"v2-{warm}",
                    trainer=trainer,
                    hyperparams=hp,
                    samples_path=str(samples),
                    champion=champion,
                    warm_start=warm,
                )
            )
        )
        for warm in (True, False)
    ]
    warm, cold = runs
    assert warm.warm_start == {"requested": True, "used": True, "from_version": 1}
    assert cold.warm_start["used"] is False
    assert warm.reproducibility["config_sha256"] != cold.reproducibility["config_sha256"]
    assert warm.metrics["challenger"]["golden_accuracy"] > 0.8


def test_warm_start_with_another_architecture_trains_from_scratch(tmp_path: Path) -> None:
    run_job(JobSpec.from_dict(spec_dict(tmp_path / "v1", hyperparams={"max_iter": 30})))
    champion = {
        "version": 1,
        "onnx_path": str(tmp_path / "v1" / "model.onnx"),
        "weights_path": str(tmp_path / "v1" / "weights.npz"),
    }
    report = run_job(
        JobSpec.from_dict(
            spec_dict(
                tmp_path / "v2",
                hyperparams={"hidden_layer_sizes": [16], "max_iter": 30},
                champion=champion,
                warm_start=True,
            )
        )
    )
    assert report.warm_start == {"requested": True, "used": False, "from_version": None}
