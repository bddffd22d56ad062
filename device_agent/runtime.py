"""Model runtime: build inference sessions off the serving path and swap them atomically.

``ModelRuntime`` holds one immutable ``Loaded`` reference. ``predict`` reads that reference once,
so a call that started before a swap finishes on the old session while new calls use the new one;
Python's reference assignment is atomic, so no lock sits on the inference path. The old session is
released by garbage collection once the last in-flight call returns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.manifest import OUTPUT_NAME, Manifest
from device_agent.errors import InferenceError, ModelLoadError, NoModelError

_NP_DTYPES = {"float32": np.float32, "float64": np.float64, "uint8": np.uint8, "int64": np.int64}


@dataclass(frozen=True)
class Loaded:
    """A ready-to-serve session and the verified manifest it came from."""

    session: ort.InferenceSession
    manifest: Manifest
    input_name: str
    output_index: int
    model_version: int
    sha256: str


@dataclass(frozen=True)
class RawPrediction:
    label: int
    confidence: float
    probabilities: np.ndarray
    latency_ms: float


def _sample_shape(manifest: Manifest) -> tuple[int, ...]:
    """Input shape for a batch of one: the batch dimension (-1) becomes 1."""
    return tuple(1 if d == -1 else d for d in manifest.input_spec.shape)


class ModelRuntime:
    """Serves one model at a time; ``load`` + ``swap`` replace it without dropping a call."""

    def __init__(self, *, intra_op_num_threads: int = 1) -> None:
        self._threads = intra_op_num_threads
        self._loaded: Loaded | None = None
        self._swap_lock = threading.Lock()  # serialises swaps, never taken by predict

    @property
    def current(self) -> Loaded | None:
        return self._loaded

    def load(self, path: Path, manifest: Manifest) -> Loaded:
        """Build and warm up a session for a verified artifact, without touching serving.

        Raises:
            ModelLoadError: ONNX Runtime rejects the file, the input/output do not match the
                manifest, or the warm-up inference fails.
        """
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception zoo
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from exc
        inputs = session.get_inputs()
        names = [i.name for i in inputs]
        spec = manifest.input_spec
        if spec.name not in names:
            raise ModelLoadError(f"model inputs {names} lack the manifest input {spec.name!r}")
        outputs = [o.name for o in session.get_outputs()]
        if OUTPUT_NAME not in outputs:
            raise ModelLoadError(f"model outputs {outputs} lack {OUTPUT_NAME!r}")
        output_index = outputs.index(OUTPUT_NAME)
        zero = np.zeros(_sample_shape(manifest), dtype=_NP_DTYPES[spec.dtype])
        try:
            out = session.run([OUTPUT_NAME], {spec.name: zero})[0]
        except Exception as exc:
            raise ModelLoadError(f"warm-up inference failed: {exc}") from exc
        if out.shape != (1, len(manifest.labels)):
            raise ModelLoadError(
                f"output shape {out.shape} does not match {len(manifest.labels)} labels"
            )
        return Loaded(
            session=session,
            manifest=manifest,
            input_name=spec.name,
            output_index=output_index,
            model_version=manifest.model_version,
            sha256=manifest.artifact.sha256,
        )

    def swap(self, loaded: Loaded) -> Loaded | None:
        """Make ``loaded`` the serving model; return the one it replaced."""
        with self._swap_lock:
            old, self._loaded = self._loaded, loaded
        return old

    def predict(self, x: np.ndarray) -> tuple[RawPrediction, Loaded]:
        """Classify one sample with whichever model is serving when the call starts.

        Args:
            x: one sample; any shape holding exactly ``input_spec.features`` values.

        Returns:
            The prediction and the ``Loaded`` model that produced it.

        Raises:
            NoModelError: no model serves yet.
            InferenceError: ONNX Runtime failed (carries the model version).
            ValueError: ``x`` holds the wrong number of values.
        """
        loaded = self._loaded  # read once: the whole call uses this session
        if loaded is None:
            raise NoModelError("no verified model is serving yet")
        spec = loaded.manifest.input_spec
        arr = np.asarray(x)
        if arr.size != spec.features:
            raise ValueError(f"input holds {arr.size} values, the model expects {spec.features}")
        feed = arr.astype(_NP_DTYPES[spec.dtype], copy=False).reshape(
            _sample_shape(loaded.manifest)
        )
        t0 = time.perf_counter()
        try:
            probs = loaded.session.run([OUTPUT_NAME], {loaded.input_name: feed})[0][0]
        except Exception as exc:
            raise InferenceError(
                f"inference failed: {exc}", model_version=loaded.model_version
            ) from exc
        latency_ms = (time.perf_counter() - t0) * 1000.0
        label = int(np.argmax(probs))
        raw = RawPrediction(
            label=label, confidence=float(probs[label]), probabilities=probs, latency_ms=latency_ms
        )
        return raw, loaded
