"""Read an ONNX model's ``metadata_props`` with ONNX Runtime (no ``onnx`` package on a server).

The monitoring reference and the self-test vectors travel there, inside the signed bytes; a
server reads them from the very file devices run, as the agent does (``device_agent.runtime``).
"""

from __future__ import annotations

from server.core.errors import ArtifactError


def onnx_metadata(onnx_bytes: bytes) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict.

    Raises:
        ArtifactError: ONNX Runtime cannot load the bytes as a model.
    """
    import onnxruntime as ort  # loads a native library: only when a model is read

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for bad bytes
        raise ArtifactError(f"not a model ONNX Runtime can load: {exc}") from exc
    return dict(session.get_modelmeta().custom_metadata_map)


__all__ = ["onnx_metadata"]
