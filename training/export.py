"""ONNX export and the ONNX Runtime parity check.

Every exported model has the same face, whatever trained it: one input (``input`` by default),
float32 ``[batch, *sample_shape]`` (the input spec's shape: ``[batch, F]`` for flat data,
``[batch, C, H, W]`` for images); one output named ``probabilities`` (``contract.OUTPUT_NAME``),
float32 ``[batch, n_classes]``; default-domain opset pinned to :data:`OPSET`; all weights inlined
(no external data files), so the bytes that are hashed and signed are the whole model.

Training provenance (dataset version, trainer, seed, job id, model line) travels inside the model as
``metadata_props``, so a file found on a device can be traced back to the job that made it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from contract import OUTPUT_NAME
from training.errors import ExportError, ParityError

OPSET = 17  # default-domain opset of every exported model
ML_OPSET = 3  # highest ai.onnx.ml opset skl2onnx may use (LinearClassifier etc.)
IR_VERSION = 8  # ONNX IR of opset 17; newer IRs are refused by the older ORT on devices
BATCH_DIM = "batch"  # symbolic name of the dynamic batch dimension

# Parity thresholds between the training framework and ONNX Runtime on the golden holdout.
MIN_ARGMAX_AGREEMENT = 0.999  # fraction of samples whose predicted class must agree
MAX_ABS_DIFF = 1e-3  # largest allowed |p_framework - p_onnx| over all samples and classes


def sklearn_to_onnx(estimator: Any, *, n_features: int, input_name: str = "input") -> bytes:
    """Convert a fitted scikit-learn classifier with skl2onnx (no ZipMap, probabilities only).

    Raises:
        ExportError: skl2onnx cannot convert the estimator, or the result is invalid.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    try:
        model = convert_sklearn(
            estimator,
            initial_types=[(input_name, FloatTensorType([None, n_features]))],
            target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
            options={id(estimator): {"zipmap": False}},
        )
        # skl2onnx also emits an int64 "label" output; the contract has one output, so keep
        # only the subgraph that computes the probabilities.
        model = onnx.utils.Extractor(model).extract_model([input_name], [OUTPUT_NAME])
        # skl2onnx picks the lowest opset its operators need; pin the model to OPSET.
        model = onnx.version_converter.convert_version(_dedupe_opsets(model), OPSET)
    except ExportError:
        raise
    except Exception as exc:  # skl2onnx and onnx raise many unrelated types
        raise ExportError(f"skl2onnx could not export {type(estimator).__name__}: {exc}") from exc
    import skl2onnx

    return _finish(model, input_name, f"skl2onnx {skl2onnx.__version__}")


def torch_to_onnx(net: Any, *, sample_shape: tuple[int, ...], input_name: str = "input") -> bytes:
    """Export a torch module whose ``forward`` returns probabilities (TorchScript exporter).

    The input is ``[batch, *sample_shape]`` float32, as the input spec (and so the device) says.

    Raises:
        ExportError: the exporter fails or the result is invalid.
    """
    import torch

    buf = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(
                net,
                (torch.zeros(1, *sample_shape, dtype=torch.float32),),
                buf,  # type: ignore[arg-type]  # the TorchScript exporter takes file objects
                dynamo=False,
                opset_version=OPSET,
                input_names=[input_name],
                output_names=[OUTPUT_NAME],
                dynamic_axes={input_name: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                do_constant_folding=True,
            )
        model = onnx.load_from_string(buf.getvalue())
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed: {exc}") from exc
    return _finish(model, input_name, f"torch {torch.__version__}")


def _dedupe_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep one opset import per domain (the highest); skl2onnx can list a domain twice."""
    best: dict[str, int] = {}
    for imp in model.opset_import:
        best[imp.domain] = max(best.get(imp.domain, 0), imp.version)
    del model.opset_import[:]
    for domain, version in sorted(best.items()):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    return model


def _finish(model: onnx.ModelProto, input_name: str, exporter: str) -> bytes:
    """Normalise names and batch dimension, then check the model is valid and self-contained.

    Exporters put random ids in the graph name; a fixed name keeps the bytes (and so the hash
    that gets signed) a function of the weights alone.
    """
    model = _dedupe_opsets(model)
    model.ir_version = IR_VERSION
    model.graph.name = "edgeloop"
    model.producer_name = "edgeloop-training"
    model.producer_version = exporter
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [input_name] or outputs != [OUTPUT_NAME]:
        raise ExportError(f"exported model has inputs {inputs} and outputs {outputs}")
    for value, ranks in ((model.graph.input[0], (2, 4)), (model.graph.output[0], (2,))):
        dims = value.type.tensor_type.shape.dim
        if len(dims) not in ranks:
            raise ExportError(f"{value.name} must have rank {ranks} [batch, ...], got {len(dims)}")
        dims[0].dim_param = BATCH_DIM  # replaces skl2onnx's anonymous dim / "unk__0"
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"initializer {init.name} is stored externally")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported model is invalid: {exc}") from exc
    return model.SerializeToString()


def add_metadata(onnx_bytes: bytes, metadata: Mapping[str, Any]) -> bytes:
    """Return the model with ``metadata`` set in ``metadata_props`` (values stringified)."""
    model = onnx.load_from_string(onnx_bytes)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({str(k): str(v) for k, v in metadata.items()})
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


def read_metadata(onnx_bytes: bytes) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}


def onnx_predict_proba(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """Run the model with ONNX Runtime on CPU and return its ``probabilities`` output.

    Raises:
        ParityError: ORT cannot load or run the model, it has no ``probabilities`` output,
            or that output is not a 2-D tensor with one row per input row.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # tiny batches; one thread keeps results bit-stable
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        if OUTPUT_NAME not in names:
            raise ParityError(f"model has no {OUTPUT_NAME!r} output (outputs: {names})")
        inp = sess.get_inputs()[0]
        x = np.ascontiguousarray(X, dtype=np.float32)
        if len(inp.shape) > 2 and all(isinstance(d, int) for d in inp.shape[1:]):
            x = x.reshape(len(x), *inp.shape[1:])  # flat rows -> the model's image shape
        feed = {inp.name: x}
        (out,) = sess.run([OUTPUT_NAME], feed)
    except ParityError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ParityError(f"ONNX Runtime could not run the model: {exc}") from exc
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != len(X):
        raise ParityError(f"{OUTPUT_NAME} has shape {out.shape}, expected [{len(X)}, n_classes]")
    return out


def check_parity(
    onnx_bytes: bytes,
    framework_predict_proba: Callable[[np.ndarray], np.ndarray],
    X: np.ndarray,
    *,
    min_argmax_agreement: float = MIN_ARGMAX_AGREEMENT,
    max_abs_diff: float = MAX_ABS_DIFF,
) -> dict[str, Any]:
    """Compare ONNX Runtime with the training framework on ``X`` (the golden holdout).

    Returns:
        ``{"argmax_agreement", "max_abs_diff", "passed", "reason", "n_samples",
        "min_argmax_agreement", "max_abs_diff_limit"}``; a numerical disagreement is reported,
        not raised, so the job fails its gate with the reason.

    Raises:
        ParityError: the model cannot be run or its output has the wrong shape (an export bug).
    """
    ref = np.asarray(framework_predict_proba(X), dtype=np.float64)
    got = onnx_predict_proba(onnx_bytes, X).astype(np.float64)
    if got.shape != ref.shape:
        raise ParityError(f"ONNX output shape {got.shape} != framework output shape {ref.shape}")
    agreement = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1))) if len(X) else 1.0
    diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
    problems = []
    if agreement < min_argmax_agreement:
        problems.append(f"argmax agreement {agreement:.4f} < {min_argmax_agreement}")
    if not diff <= max_abs_diff:  # also catches NaN
        problems.append(f"max abs probability difference {diff:.2e} > {max_abs_diff:.0e}")
    return {
        "argmax_agreement": agreement,
        "max_abs_diff": diff,
        "passed": not problems,
        "reason": "; ".join(problems) or "ONNX Runtime agrees with the framework",
        "n_samples": len(X),
        "min_argmax_agreement": min_argmax_agreement,
        "max_abs_diff_limit": max_abs_diff,
    }


__all__ = [
    "MAX_ABS_DIFF",
    "MIN_ARGMAX_AGREEMENT",
    "OPSET",
    "add_metadata",
    "check_parity",
    "onnx_predict_proba",
    "read_metadata",
    "sklearn_to_onnx",
    "torch_to_onnx",
]
