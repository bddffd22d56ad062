"""Model runtime: build inference sessions off the serving path and swap them atomically.

``ModelRuntime`` holds one immutable ``Loaded`` reference. ``predict`` reads that reference once,
so a call that started before a swap finishes on the old session while new calls use the new one;
Python's reference assignment is atomic, so no lock sits on the inference path.

A replaced session is *retired*, not dropped: ``release_retired`` (called by the updater, never by
an inference) waits until no in-flight call still holds it and then frees it on the updater's
thread, so no inference ever pays for a session's destructor, and memory returns to the allocator
(``malloc_trim``) instead of growing across swaps. At most two models are alive during a swap.

Before a session is built, ``load`` checks memory headroom, and after warm-up it runs the bundle's
self-test vectors when the ONNX file carries them: metadata property ``edgeloop.selftest`` holding
``{"inputs": [[...], ...], "labels": [...]}``. It also reads the monitoring reference (metadata
``edgeloop.monitoring``, see ``device_agent.monitor``). The metadata is inside the signed bytes.

Sessions are onnxruntime ``InferenceSession`` objects, built on the caller's thread (the
updater's, never a serving thread). ONNX Runtime releases the GIL for most of a build (model
load and session initialisation, about four fifths of it), so inferences on other threads keep
running. Its binding holds the GIL while it constructs the C++ session (~0.1 ms for digits) and
while it destroys one, and so does the Python around them: an inference that comes back from its
run during such a stretch waits for the rest of it. What a swap costs inferences is measured by
``benchmarks/agent_bench.py`` (on a device that leaves the updater one core) and located by
``benchmarks/swap_gil_trace.py``.

The cyclic garbage collector is a worse stall: a full collection holds the GIL for tens of
milliseconds once numpy and ONNX Runtime are loaded. ``freeze_heap`` (called once the agent
serves) moves everything alive at start-up into the permanent generation, so later collections
only scan what the agent allocated since.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.manifest import OUTPUT_NAME, Manifest
from contract.monitoring import METADATA_KEY as MONITORING_KEY
from contract.monitoring import MonitoringReference
from device_agent.errors import (
    InferenceError,
    InsufficientMemoryError,
    ModelLoadError,
    NoModelError,
    SelfTestError,
)
from device_agent.monitor import load_reference

log = logging.getLogger(__name__)
SELFTEST_KEY = "edgeloop.selftest"
_MiB = 1024 * 1024


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The symbols the process already has: glibc's, without ctypes.util (which imports
        # subprocess just to find a library that is loaded anyway).
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def tune_interpreter(switch_interval_s: float) -> None:
    """Lower the interpreter's thread switch interval (process-wide, never raised).

    A thread waiting for the GIL waits up to one switch interval (5 ms by default) before the
    holder is asked to let go at its next bytecode; 0.5 ms bounds an inference's wait behind the
    updater's Python (and behind the parts of a session build or destroy that hold it) to that
    plus the longest single call.
    """
    if 0 < switch_interval_s < sys.getswitchinterval():
        sys.setswitchinterval(switch_interval_s)


_heap_frozen = threading.Event()


def freeze_heap() -> bool:
    """Collect, then exempt every object alive now from later collections (``gc.freeze``).

    Call when start-up is over (imports done, first model serving). Objects allocated later are
    still collected; a full collection then scans those alone instead of the ~10^5 objects of
    numpy, ONNX Runtime and the standard library, which took 38-63 ms with the GIL held. Acts
    once per process (a simulator runs many agents in one): returns True the time it froze.
    """
    if _heap_frozen.is_set():
        return False
    _heap_frozen.set()
    gc.collect()
    gc.freeze()
    return True


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc); a no-op elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# Level name -> the GraphOptimizationLevel member it selects.
_GRAPH_OPT = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def runtime_version() -> str:
    """The ONNX Runtime version serving models in this process (what devices report)."""
    return str(onnxruntime_module().__version__)


TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def onnxruntime_module() -> Any:
    """The onnxruntime module, imported with ONNX Runtime's telemetry off unless the process
    environment already says otherwise.

    The onnxruntime 1.32 wheels carry Microsoft's 1DS telemetry: importing them writes a device
    id and a growing SQLite database under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``
    (5 MB in an afternoon of tests here) and keeps a thread for it. An edge agent wants neither
    the flash writes nor the traffic. ``ORT_DISABLE_TELEMETRY=1``, read when onnxruntime is
    imported, turns it off (1.6 MB less resident, one thread fewer); an operator's own setting
    of the variable wins.
    """
    os.environ.setdefault(TELEMETRY_ENV, "1")
    import onnxruntime

    return onnxruntime


_NP_DTYPES = {"float32": np.float32, "float64": np.float64, "uint8": np.uint8, "int64": np.int64}


@dataclass(frozen=True)
class Loaded:
    """A ready-to-serve session and the verified manifest it came from."""

    session: Any  # onnxruntime.InferenceSession (imported lazily: not at agent import)
    manifest: Manifest
    input_name: str
    output_index: int
    model_version: int
    sha256: str
    # The monitoring reference from the model's metadata (device_agent.monitor); None: the
    # model is served unmonitored.
    monitoring: MonitoringReference | None = None


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

    def __init__(
        self,
        *,
        intra_op_num_threads: int = 1,
        graph_optimization: str = "basic",  # "disable", "basic", "extended" or "all"
        min_free_memory_bytes: int = 0,  # bytes that must stay free after a load
        load_headroom_factor: float = 4.0,  # x artifact size a load may need
        memory_probe: Callable[[], int | None] = available_memory_bytes,
    ) -> None:
        if graph_optimization not in _GRAPH_OPT:
            raise ValueError(f"unknown graph_optimization {graph_optimization!r}")
        self._threads = intra_op_num_threads
        self._graph_opt = graph_optimization
        self._min_free = min_free_memory_bytes
        self._headroom = load_headroom_factor
        self._memory_probe = memory_probe
        self._loaded: Loaded | None = None
        self._swap_lock = threading.Lock()  # serialises swaps, never taken by predict
        self._retired: list[Loaded] = []  # replaced sessions awaiting release
        self.swaps = 0
        self.released = 0
        self.last_free_cpu_s = 0.0  # CPU seconds the last release spent destroying sessions
        self.last_free_wall_s = 0.0  # wall seconds of the same destruction

    @property
    def current(self) -> Loaded | None:
        return self._loaded

    def check_headroom(self, artifact_bytes: int) -> None:
        """Raise InsufficientMemoryError if loading ``artifact_bytes`` could starve serving."""
        avail = self._memory_probe()
        if avail is None:
            return
        need = int(artifact_bytes * self._headroom) + self._min_free
        if avail < need:
            raise InsufficientMemoryError(
                f"{avail // _MiB} MiB available, loading needs {need // _MiB} MiB "
                f"({self._headroom:g}x the {artifact_bytes} byte artifact + reserve)"
            )

    def load(self, path: Path, manifest: Manifest) -> Loaded:
        """Build and warm up a session for a verified artifact, without touching serving.

        Raises:
            InsufficientMemoryError: not enough free memory (checked before building).
            ModelLoadError: ONNX Runtime rejects the file, the input/output do not match the
                manifest, or the warm-up inference fails.
            SelfTestError: the bundle's self-test vectors give other labels.
        """
        self.check_headroom(manifest.artifact.size)
        return self.prepare(self.build(path), manifest)

    def build(self, path: Path) -> Any:
        """Build an ONNX Runtime session for ``path`` (the first half of ``load``).

        Raises:
            ModelLoadError: ONNX Runtime rejects the file.
        """
        try:
            return self._build(path)
        except Exception as exc:  # onnxruntime raises its own exception zoo
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from exc

    def prepare(self, session: Any, manifest: Manifest) -> Loaded:
        """Check, warm up and self-test a built session (the second half of ``load``).

        Raises:
            ModelLoadError: the input/output do not match the manifest, or the warm-up fails.
            SelfTestError: the bundle's self-test vectors give other labels.
        """
        spec = manifest.input_spec
        inputs = session.get_inputs()
        names = [i.name for i in inputs]
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
        meta = session.get_modelmeta().custom_metadata_map  # read once: a call holds the GIL
        _self_test(session, manifest, meta.get(SELFTEST_KEY))
        return Loaded(
            session=session,
            manifest=manifest,
            input_name=spec.name,
            output_index=output_index,
            model_version=manifest.model_version,
            sha256=manifest.artifact.sha256,
            monitoring=load_reference(meta.get(MONITORING_KEY), manifest),
        )

    def _build(self, path: Path) -> Any:
        ort = onnxruntime_module()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _GRAPH_OPT[self._graph_opt]
        )
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def swap(self, loaded: Loaded | None, *, retire: bool = False) -> Loaded | None:
        """Make ``loaded`` the serving model; return the one it replaced.

        With ``retire``, the replaced model is also queued for ``release_retired`` (the caller
        should then drop its own reference).
        """
        with self._swap_lock:
            old, self._loaded = self._loaded, loaded
            self.swaps += 1
            if retire and old is not None and old is not loaded:
                self._retired.append(old)
        return old

    def retire(self, loaded: Loaded) -> None:
        """Queue a model that no longer serves for release (drop your reference after)."""
        with self._swap_lock:
            if loaded is not self._loaded:
                self._retired.append(loaded)

    def release_retired(self, wait_s: float = 5.0) -> int:
        """Free retired sessions once no in-flight inference holds them; returns how many.

        Runs on the caller's (updater's) thread. An in-flight ``predict`` holds a reference to
        its ``Loaded``; the retired list plus ``getrefcount``'s argument account for two.
        """
        deadline = time.monotonic() + wait_s
        freed = 0
        free_s = free_wall_s = 0.0
        while True:
            with self._swap_lock:
                idle = [r for r in self._retired if sys.getrefcount(r) <= 3]
                self._retired = [r for r in self._retired if all(r is not i for i in idle)]
            freed += len(idle)
            t_free, w_free = time.thread_time(), time.perf_counter()
            del idle  # the last references: sessions are destroyed here, off the serving path
            free_s += time.thread_time() - t_free
            free_wall_s += time.perf_counter() - w_free
            if not self._retired or time.monotonic() >= deadline:
                break
            time.sleep(0.0005)
        if freed:
            self.released += freed
            trim_heap()  # a ctypes call: runs without the GIL, serving is not held up
        self.last_free_cpu_s = free_s
        self.last_free_wall_s = free_wall_s
        return freed

    @property
    def retired_count(self) -> int:
        return len(self._retired)

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
        return classify(loaded, x), loaded


def classify(loaded: Loaded, x: np.ndarray) -> RawPrediction:
    """Run one sample through ``loaded`` (the serving model, or a shadow challenger).

    Raises:
        InferenceError: ONNX Runtime failed (carries the model version).
        ValueError: ``x`` holds the wrong number of values.
    """
    spec = loaded.manifest.input_spec
    arr = np.asarray(x)
    if arr.size != spec.features:
        raise ValueError(f"input holds {arr.size} values, the model expects {spec.features}")
    feed = arr.astype(_NP_DTYPES[spec.dtype], copy=False).reshape(_sample_shape(loaded.manifest))
    t0 = time.perf_counter()
    try:
        probs = loaded.session.run([OUTPUT_NAME], {loaded.input_name: feed})[0][0]
    except Exception as exc:
        msg = f"inference failed: {exc}"
        raise InferenceError(msg, model_version=loaded.model_version) from exc
    latency_ms = (time.perf_counter() - t0) * 1000.0
    label = int(np.argmax(probs))
    return RawPrediction(
        label=label, confidence=float(probs[label]), probabilities=probs, latency_ms=latency_ms
    )


def _self_test(session: Any, manifest: Manifest, raw: str | None) -> None:
    """Run the bundle's self-test vectors ``raw`` (its metadata's JSON), if it carries any."""
    if raw is None:
        return
    try:
        spec = json.loads(raw)
        inputs = np.asarray(spec["inputs"], dtype=_NP_DTYPES[manifest.input_spec.dtype])
        labels = [int(v) for v in spec["labels"]]
        batch = inputs.reshape((len(labels), *_sample_shape(manifest)[1:]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SelfTestError(f"self-test vectors are malformed: {exc}") from exc
    try:
        probs = session.run([OUTPUT_NAME], {manifest.input_spec.name: batch})[0]
    except Exception as exc:
        raise SelfTestError(f"self-test inference failed: {exc}") from exc
    got = [int(v) for v in np.argmax(probs, axis=1)]
    wrong = sum(1 for a, b in zip(got, labels, strict=True) if a != b)
    if wrong:
        raise SelfTestError(f"{wrong} of {len(labels)} self-test vectors gave another label")
    log.info("self-test passed (%d vectors)", len(labels))
