"""ONNX export: the contract's face (one input, one ``probabilities`` output), parity, metadata."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from contract import OUTPUT_NAME
from tests.training.training_testkit import FAST_CNN
from training.data import digits_pools
from training.errors import ParityError
from training.export import (
    OPSET,
    add_metadata,
    check_parity,
    onnx_predict_proba,
    read_metadata,
)
from training.trainers import train

TRAINERS = {"sklearn-mlp": {}, "sklearn-logreg": {}, "torch-cnn": FAST_CNN}


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def fitted(request):
    """(name, fitted model, onnx bytes) for each trainer, trained once on the base pool."""
    pools = digits_pools()
    model, _ = train(
        request.param,
        pools.train.X,
        pools.train.y,
        n_classes=10,
        seed=0,
        hyperparams=TRAINERS[request.param],
    )
    return request.param, model, model.to_onnx()


def test_exported_model_has_the_contract_interface(fitted):
    _, _, raw = fitted
    model = onnx.load_from_string(raw)
    onnx.checker.check_model(model, full_check=True)

    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 64
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == 10
    assert {i.domain or "ai.onnx": i.version for i in model.opset_import}["ai.onnx"] == OPSET
    assert model.ir_version == 8  # loadable by the ORT releases devices run
    # Weights are inlined: the bytes are the whole model.
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_onnx_runtime_agrees_with_the_framework(fitted):
    _, model, raw = fitted
    golden = digits_pools().golden
    proba = onnx_predict_proba(raw, golden.X)

    assert proba.shape == (len(golden.y), 10) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(proba.argmax(1), model.predict_proba(golden.X).argmax(1))

    parity = check_parity(raw, model.predict_proba, golden.X)
    assert parity["passed"], parity
    assert parity["argmax_agreement"] == 1.0
    assert parity["max_abs_diff"] < 1e-4
    # Batch size is dynamic: one row works as well as 300.
    assert onnx_predict_proba(raw, golden.X[:1]).shape == (1, 10)
    # And the model is actually good.
    assert (proba.argmax(1) == golden.y).mean() > 0.85


def test_parity_failure_is_reported_not_raised(fitted):
    _, model, raw = fitted
    X = digits_pools().golden.X

    def shifted(x: np.ndarray) -> np.ndarray:
        return np.roll(model.predict_proba(x), 1, axis=1)

    parity = check_parity(raw, shifted, X)
    assert parity["passed"] is False
    assert parity["argmax_agreement"] < 0.5
    assert "argmax agreement" in parity["reason"]

    def nudged(x: np.ndarray) -> np.ndarray:
        return model.predict_proba(x) + 0.01

    parity = check_parity(raw, nudged, X)
    assert parity["passed"] is False and "max abs probability difference" in parity["reason"]


def test_metadata_round_trip():
    pools = digits_pools()
    model, _ = train("sklearn-logreg", pools.train.X, pools.train.y, n_classes=10, seed=0)
    meta = {"dataset_version": "ab" * 32, "trainer": "sklearn-logreg", "seed": 3, "job_id": 9}
    raw = add_metadata(model.to_onnx(), meta)
    assert read_metadata(raw) == {k: str(v) for k, v in meta.items()}
    assert read_metadata(add_metadata(raw, {"seed": 4}))["seed"] == "4"


def test_custom_input_name():
    pools = digits_pools()
    model, _ = train("sklearn-logreg", pools.train.X, pools.train.y, n_classes=10, seed=0)
    raw = model.to_onnx(input_name="pixels")
    assert [i.name for i in onnx.load_from_string(raw).graph.input] == ["pixels"]
    assert onnx_predict_proba(raw, pools.golden.X[:3]).shape == (3, 10)


def test_model_without_probabilities_output_is_a_parity_error():
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 64])
    y = onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [None, 64])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["scores"])], "g", [x], [y]
    )
    raw = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=8
    )
    with pytest.raises(ParityError, match="no 'probabilities' output"):
        onnx_predict_proba(raw.SerializeToString(), np.zeros((2, 64), np.float32))
    with pytest.raises(ParityError, match="could not run"):
        onnx_predict_proba(b"garbage", np.zeros((2, 64), np.float32))
