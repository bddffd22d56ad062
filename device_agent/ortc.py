"""ONNX Runtime through its C API (ctypes): sessions are built, run and freed without the GIL.

The ``onnxruntime`` Python package holds the GIL while it parses a model and while it destroys a
session, so on a small device every model swap stalls the threads that serve inferences. The
same wheel ships ``libonnxruntime.so``, whose C API (``OrtGetApiBase``) is a stable, append-only
table of function pointers (the interface the Go, Rust, C# and Java bindings use). Calling it
through ctypes releases the GIL for the calls that take time (``CreateSessionFromArray``,
``Run``, ``ReleaseSession``) and keeps it for the sub-microsecond accessors (``PYFUNCTYPE``), so
a thread building a new session never holds up a thread serving the old one. It also spares the
agent the Python package's own 36 MB extension module.

The table indices below are ``OrtApi`` member positions in ``onnxruntime_c_api.h``; members
are only ever appended, so they hold for every library that grants ``API_VERSION``. A library
that does not (older than 1.17) makes ``load`` raise ``OrtUnavailable`` and the agent falls back
to the Python package.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

API_VERSION = 17  # the OrtApi we request: ONNX Runtime >= 1.17 grants it
LIBRARY_ENV = "EDGELOOP_ORT_LIBRARY"  # path of libonnxruntime.so, when not the wheel's

# GraphOptimizationLevel and ONNXTensorElementDataType values of the C API.
GRAPH_OPT = {"disable": 0, "basic": 1, "extended": 2, "all": 99}
_ELEM_TO_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 11: np.float64}
_NP_TO_ELEM = {np.dtype(v): k for k, v in _ELEM_TO_NP.items()}
_ORT_DEVICE_ALLOCATOR, _ORT_MEM_TYPE_DEFAULT = 0, 0
_LOG_ERROR = 3

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_SZ = ctypes.c_size_t
_I = ctypes.c_int
_S = ctypes.c_char_p


class OrtUnavailable(OSError):
    """No usable ONNX Runtime C library in this environment."""


class OrtError(RuntimeError):
    """ONNX Runtime returned an error status."""


# (index, returns a status, releases the GIL, argument types): the OrtApi members used here.
_MEMBERS: dict[str, tuple[int, bool, bool, tuple[Any, ...]]] = {
    "GetErrorMessage": (2, False, False, (_P,)),
    "CreateEnv": (3, True, False, (_I, _S, _PP)),
    "CreateSession": (7, True, True, (_P, _S, _P, _PP)),  # ORTCHAR_T is char off Windows
    "CreateSessionFromArray": (8, True, True, (_P, _S, _SZ, _P, _PP)),
    "Run": (9, True, True, (_P, _P, _P, _P, _SZ, _P, _SZ, _P)),
    "CreateSessionOptions": (10, True, False, (_PP,)),
    "SetSessionLogSeverityLevel": (22, True, False, (_P, _I)),
    "SetSessionGraphOptimizationLevel": (23, True, False, (_P, _I)),
    "SetIntraOpNumThreads": (24, True, False, (_P, _I)),
    "SetInterOpNumThreads": (25, True, False, (_P, _I)),
    "SessionGetInputCount": (30, True, False, (_P, ctypes.POINTER(_SZ))),
    "SessionGetOutputCount": (31, True, False, (_P, ctypes.POINTER(_SZ))),
    "SessionGetInputName": (36, True, False, (_P, _SZ, _P, _PP)),
    "SessionGetOutputName": (37, True, False, (_P, _SZ, _P, _PP)),
    "CreateTensorWithDataAsOrtValue": (
        49,
        True,
        False,
        (_P, _P, _SZ, ctypes.POINTER(ctypes.c_int64), _SZ, _I, _PP),
    ),
    "GetTensorMutableData": (51, True, False, (_P, _PP)),
    "GetTensorElementType": (60, True, False, (_P, ctypes.POINTER(_I))),
    "GetDimensionsCount": (61, True, False, (_P, ctypes.POINTER(_SZ))),
    "GetDimensions": (62, True, False, (_P, ctypes.POINTER(ctypes.c_int64), _SZ)),
    "GetTensorTypeAndShape": (65, True, False, (_P, _PP)),
    "CreateCpuMemoryInfo": (69, True, False, (_I, _I, _PP)),
    "AllocatorFree": (76, True, False, (_P, _P)),
    "GetAllocatorWithDefaultOptions": (78, True, False, (_PP,)),
    "ReleaseStatus": (93, False, False, (_P,)),
    "ReleaseMemoryInfo": (94, False, False, (_P,)),
    "ReleaseSession": (95, False, True, (_P,)),
    "ReleaseValue": (96, False, False, (_P,)),
    "ReleaseTensorTypeAndShapeInfo": (99, False, False, (_P,)),
    "ReleaseSessionOptions": (100, False, False, (_P,)),
    "SessionGetModelMetadata": (111, True, False, (_P, _PP)),
    "ModelMetadataLookupCustomMetadataMap": (116, True, False, (_P, _P, _S, _PP)),
    "ReleaseModelMetadata": (118, False, False, (_P,)),
}


def library_path() -> str | None:
    """``$EDGELOOP_ORT_LIBRARY``, else the ``libonnxruntime.so`` inside the onnxruntime wheel
    (found without importing the package), else None."""
    forced = os.environ.get(LIBRARY_ENV, "").strip()
    if forced:
        return forced
    spec = importlib.util.find_spec("onnxruntime")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(folder, "capi", "libonnxruntime.so*")))
        if found:
            return found[-1]
    return None


class _Api:
    """The resolved function table of one loaded library (one attribute per ``_MEMBERS``)."""

    GetErrorMessage: Any
    CreateEnv: Any
    CreateSession: Any
    CreateSessionFromArray: Any
    Run: Any
    CreateSessionOptions: Any
    SetSessionLogSeverityLevel: Any
    SetSessionGraphOptimizationLevel: Any
    SetIntraOpNumThreads: Any
    SetInterOpNumThreads: Any
    SessionGetInputCount: Any
    SessionGetOutputCount: Any
    SessionGetInputName: Any
    SessionGetOutputName: Any
    CreateTensorWithDataAsOrtValue: Any
    GetTensorMutableData: Any
    GetTensorElementType: Any
    GetDimensionsCount: Any
    GetDimensions: Any
    GetTensorTypeAndShape: Any
    CreateCpuMemoryInfo: Any
    AllocatorFree: Any
    GetAllocatorWithDefaultOptions: Any
    ReleaseStatus: Any
    ReleaseMemoryInfo: Any
    ReleaseSession: Any
    ReleaseValue: Any
    ReleaseTensorTypeAndShapeInfo: Any
    ReleaseSessionOptions: Any
    SessionGetModelMetadata: Any
    ModelMetadataLookupCustomMetadataMap: Any
    ReleaseModelMetadata: Any

    def __init__(self, path: str) -> None:
        try:
            lib = ctypes.CDLL(path)
            get_base = lib.OrtGetApiBase
        except (OSError, AttributeError) as exc:
            raise OrtUnavailable(f"cannot load ONNX Runtime from {path}: {exc}") from exc
        get_base.restype = _PP
        get_base.argtypes = []
        base = get_base()  # struct OrtApiBase {GetApi, GetVersionString}
        get_api = ctypes.CFUNCTYPE(_P, ctypes.c_uint32)(base[0])
        version = ctypes.CFUNCTYPE(_S)(base[1])().decode()
        table = get_api(API_VERSION)
        if not table:
            raise OrtUnavailable(
                f"ONNX Runtime {version} at {path} does not grant API {API_VERSION}"
            )
        self.path, self.version = path, version
        self._keep = lib
        slots = ctypes.cast(table, _PP)
        for name, (index, status, nogil, argtypes) in _MEMBERS.items():
            proto = ctypes.CFUNCTYPE if nogil else ctypes.PYFUNCTYPE
            restype = _P if status or name == "GetErrorMessage" else None
            fn = proto(restype, *argtypes)(slots[index])
            setattr(self, name, fn)
        self.GetErrorMessage.restype = _S
        env, info, alloc = _P(), _P(), _P()
        self.check(self.CreateEnv(_LOG_ERROR, b"edgeloop", ctypes.byref(env)))
        self.check(
            self.CreateCpuMemoryInfo(
                _ORT_DEVICE_ALLOCATOR, _ORT_MEM_TYPE_DEFAULT, ctypes.byref(info)
            )
        )
        self.check(self.GetAllocatorWithDefaultOptions(ctypes.byref(alloc)))
        # One environment, memory description and allocator per process, never released.
        self.env, self.cpu, self.allocator = env, info, alloc

    def check(self, status: int | None) -> None:
        """Raise OrtError for a non-null OrtStatus (and free it)."""
        if status:
            msg = self.GetErrorMessage(status)
            text = msg.decode("utf-8", "replace") if msg else "unknown error"
            self.ReleaseStatus(status)
            raise OrtError(text)

    def take_string(self, ptr: _P) -> str | None:
        """Copy an allocator-owned C string and free it."""
        if not ptr.value:
            return None
        try:
            return ctypes.string_at(ptr.value).decode("utf-8")
        finally:
            self.check(self.AllocatorFree(self.allocator, ptr))


_api: _Api | None = None
_api_lock = threading.Lock()


def load() -> _Api:
    """The process's C API table (loaded once). Raises OrtUnavailable."""
    global _api
    if _api is None:
        with _api_lock:
            if _api is None:
                path = library_path()
                if path is None:
                    raise OrtUnavailable("libonnxruntime.so not found (set EDGELOOP_ORT_LIBRARY)")
                _api = _Api(path)
    return _api


def version() -> str:
    return load().version


@dataclass(frozen=True)
class NodeArg:
    """An input or output of a session (the part of onnxruntime's NodeArg the agent reads)."""

    name: str


class Session:
    """An inference session built through the C API (the subset of ``InferenceSession`` the
    agent uses: ``get_inputs``, ``get_outputs``, ``run``, ``custom_metadata``)."""

    def __init__(
        self,
        model: bytes | str | os.PathLike[str],
        *,
        intra_op_num_threads: int = 1,
        inter_op_num_threads: int = 1,
        graph_optimization: str = "basic",
        native: Native | None = None,
    ) -> None:
        """Build a session from ONNX bytes or a file path. ``native`` runs the build call (and,
        in ``close``, the free) elsewhere, e.g. on a low-priority thread: ``native(fn)`` returns
        ``fn()``."""
        api = self._api = load()
        self._native = native
        self._ptr = _P()
        opts = _P()
        api.check(api.CreateSessionOptions(ctypes.byref(opts)))
        try:
            api.check(api.SetIntraOpNumThreads(opts, intra_op_num_threads))
            api.check(api.SetInterOpNumThreads(opts, inter_op_num_threads))
            api.check(api.SetSessionLogSeverityLevel(opts, _LOG_ERROR))
            api.check(api.SetSessionGraphOptimizationLevel(opts, GRAPH_OPT[graph_optimization]))

            # The GIL is released for the whole read + parse + optimise + kernel set-up. A path
            # is read by ONNX Runtime itself; bytes are passed without a copy (c_char_p).
            def build() -> Any:
                if isinstance(model, bytes):
                    return api.CreateSessionFromArray(
                        api.env, model, len(model), opts, ctypes.byref(self._ptr)
                    )
                return api.CreateSession(api.env, os.fsencode(model), opts, ctypes.byref(self._ptr))

            api.check(native(build) if native else build())
        finally:
            api.ReleaseSessionOptions(opts)
        self._inputs = self._names(api.SessionGetInputCount, api.SessionGetInputName)
        self._outputs = self._names(api.SessionGetOutputCount, api.SessionGetOutputName)
        # Output shapes by call signature (names, input shapes and dtypes), the signatures whose
        # output shapes turned out not to be fixed, and each thread's reusable tensors.
        self._out_specs: dict[tuple[Any, ...], list[tuple[tuple[int, ...], np.dtype]]] = {}
        self._dynamic: set[tuple[Any, ...]] = set()
        self._local = threading.local()

    def _names(self, count_fn: Any, name_fn: Any) -> list[str]:
        api, n = self._api, _SZ()
        api.check(count_fn(self._ptr, ctypes.byref(n)))
        names = []
        for i in range(n.value):
            out = _P()
            api.check(name_fn(self._ptr, i, api.allocator, ctypes.byref(out)))
            names.append(api.take_string(out) or "")
        return names

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(n) for n in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg(n) for n in self._outputs]

    def custom_metadata(self, key: str) -> str | None:
        """One entry of the model's custom metadata map (None when absent)."""
        api, md = self._api, _P()
        api.check(api.SessionGetModelMetadata(self._ptr, ctypes.byref(md)))
        try:
            out = _P()
            api.check(
                api.ModelMetadataLookupCustomMetadataMap(
                    md, api.allocator, key.encode(), ctypes.byref(out)
                )
            )
            return api.take_string(out)
        finally:
            api.ReleaseModelMetadata(md)

    def run(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        """Run the model (the GIL is released inside); returns arrays the caller owns.

        The first call with given input shapes runs the long way (ONNX Runtime allocates the
        outputs) and records the output shapes. After that each thread reuses its own input and
        output tensors for those shapes: a run is two copies and one C call. A model whose
        output shapes depend on more than the input shapes is noticed and always run the long
        way.
        """
        if not self._ptr:
            raise OrtError("session is closed")
        names = tuple(output_names) if output_names else tuple(self._outputs)
        arrays = [np.ascontiguousarray(v) for v in feeds.values()]
        key = (names, tuple(feeds), *((a.shape, a.dtype) for a in arrays))
        bound = self._bound().get(key)
        if bound is None and key in self._out_specs:
            bound = self._bind(key, names, list(feeds), arrays)
        if bound is not None:
            for dst, src in zip(bound.inputs, arrays, strict=True):
                dst[...] = src
            status = self._api.Run(
                self._ptr,
                None,
                bound.in_names,
                bound.in_values,
                len(arrays),
                bound.out_names,
                len(names),
                bound.out_values,
            )
            if not status:
                return [o.copy() for o in bound.outputs]
            self._api.ReleaseStatus(status)
            # Run again the long way: a real error is raised there; if it passes, the output
            # shapes are not fixed by the input shapes.
            self._bound().pop(key, None)
            self._out_specs.pop(key, None)
            self._dynamic.add(key)
        outs = self._run_alloc(names, list(feeds), arrays)
        if key not in self._dynamic and len(self._out_specs) < _MAX_SHAPES:
            self._out_specs[key] = [(o.shape, o.dtype) for o in outs]
        return outs

    def _bound(self) -> dict[Any, _Bound]:
        """This thread's reusable tensors of this session, by call signature."""
        return self._local.__dict__  # type: ignore[no-any-return]

    def _bind(
        self,
        key: tuple[Any, ...],
        names: tuple[str, ...],
        feeds: list[str],
        arrays: list[np.ndarray],
    ) -> _Bound | None:
        local = self._bound()
        if len(local) >= _MAX_SHAPES:
            return None
        bound = local[key] = _Bound(self, names, feeds, arrays, self._out_specs[key])
        return bound

    def _run_alloc(
        self, names: tuple[str, ...], feeds: list[str], arrays: list[np.ndarray]
    ) -> list[np.ndarray]:
        """One run whose outputs ONNX Runtime allocates (copied out, then freed)."""
        api = self._api
        values: list[_P] = []
        try:
            for name, arr in zip(feeds, arrays, strict=True):
                values.append(self.tensor(name, arr))
            in_values = (_P * len(values))(*(v.value for v in values))
            out_values = (_P * len(names))()
            try:
                api.check(
                    api.Run(
                        self._ptr,
                        None,
                        _name_array(feeds),
                        in_values,
                        len(values),
                        _name_array(names),
                        len(names),
                        out_values,
                    )
                )
                return [self._to_numpy(out_values[i]) for i in range(len(names))]
            finally:
                for ptr in out_values:
                    if ptr:
                        api.ReleaseValue(ptr)
        finally:
            for ov in values:
                api.ReleaseValue(ov)

    def tensor(self, name: str, arr: np.ndarray) -> _P:
        """An OrtValue over ``arr``'s buffer (the caller keeps ``arr`` alive and releases it)."""
        elem = _NP_TO_ELEM.get(arr.dtype)
        if elem is None:
            raise OrtError(f"{name!r}: unsupported dtype {arr.dtype}")
        shape = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        ov = _P()
        self._api.check(
            self._api.CreateTensorWithDataAsOrtValue(
                self._api.cpu, arr.ctypes.data, arr.nbytes, shape, arr.ndim, elem, ctypes.byref(ov)
            )
        )
        return ov

    def _to_numpy(self, value: int | None) -> np.ndarray:
        if not value:
            raise OrtError("ONNX Runtime returned no value for an output")
        api, info = self._api, _P()
        api.check(api.GetTensorTypeAndShape(value, ctypes.byref(info)))
        try:
            elem, ndim = _I(), _SZ()
            api.check(api.GetTensorElementType(info, ctypes.byref(elem)))
            api.check(api.GetDimensionsCount(info, ctypes.byref(ndim)))
            dims = (ctypes.c_int64 * ndim.value)()
            api.check(api.GetDimensions(info, dims, ndim.value))
        finally:
            api.ReleaseTensorTypeAndShapeInfo(info)
        dtype = _ELEM_TO_NP.get(elem.value)
        if dtype is None:
            raise OrtError(f"output element type {elem.value} is not supported")
        out = np.empty(tuple(dims), dtype=dtype)
        data = _P()
        api.check(api.GetTensorMutableData(value, ctypes.byref(data)))
        if out.nbytes:
            ctypes.memmove(out.ctypes.data, data, out.nbytes)
        return out

    def close(self) -> None:
        """Free the session now (the GIL is released while ONNX Runtime tears it down).

        Only the owner calls this, once no run is in flight (the agent's runtime waits for
        that before it drops a retired session).
        """
        ptr, self._ptr = self._ptr, _P()
        self._local = threading.local()  # this thread's bound tensors go now, others' with us
        if ptr:
            if self._native is not None and not sys.is_finalizing():
                self._native(lambda: self._api.ReleaseSession(ptr))
            else:
                self._api.ReleaseSession(ptr)

    def __del__(self) -> None:
        if getattr(self, "_ptr", None):
            self.close()


Native = Callable[[Callable[[], Any]], Any]  # runs a native call somewhere, returns its result


_MAX_SHAPES = 16  # call signatures remembered per session (and bound per thread)


def _name_array(names: Sequence[str]) -> Any:
    return (_S * len(names))(*(n.encode() for n in names))


class _Bound:
    """One thread's reusable input and output tensors for one call signature of a session."""

    def __init__(
        self,
        session: Session,
        names: tuple[str, ...],
        feeds: list[str],
        arrays: list[np.ndarray],
        out_specs: list[tuple[tuple[int, ...], np.dtype]],
    ) -> None:
        self._api = session._api
        self.inputs = [np.empty(a.shape, a.dtype) for a in arrays]
        self.outputs = [np.empty(shape, dtype) for shape, dtype in out_specs]
        self.in_names, self.out_names = _name_array(feeds), _name_array(names)
        self.in_values = (_P * len(arrays))()
        self.out_values = (_P * len(names))()
        try:
            for i, (name, arr) in enumerate(zip(feeds, self.inputs, strict=True)):
                self.in_values[i] = session.tensor(name, arr).value
            for i, (name, arr) in enumerate(zip(names, self.outputs, strict=True)):
                self.out_values[i] = session.tensor(name, arr).value
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for values in (self.in_values, self.out_values):
            for i, ptr in enumerate(values):
                if ptr:
                    self._api.ReleaseValue(ptr)
                    values[i] = None

    def __del__(self) -> None:
        self.release()
