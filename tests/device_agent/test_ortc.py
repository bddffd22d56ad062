"""ONNX Runtime through its C API (device_agent.ortc), against the onnxruntime Python package.

Real ONNX Runtime on both sides: the wheel's libonnxruntime.so through ctypes, and the package's
own extension, given the same models and inputs.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent import ortc, runtime

RNG = np.random.default_rng(7)


def mlp(hidden: int = 32, *, meta: dict[str, str] | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(size=(64, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(hidden, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        ],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta:
        helper.set_model_props(model, meta)
    return model.SerializeToString()


def nonzero_model() -> bytes:
    """Output shape depends on the input's values, not only its shape."""
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["idx"])],
        "nz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def reference(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def test_same_outputs_as_the_python_package_for_every_batch_shape() -> None:
    model = mlp()
    ours, ref = ortc.Session(model), reference(model)
    assert [n.name for n in ours.get_inputs()] == ["x"]
    assert [n.name for n in ours.get_outputs()] == ["probabilities", "label"]
    for batch in (1, 1, 3, 1, 7, 3):  # repeats take the bound-tensor path
        x = RNG.normal(size=(batch, 64)).astype(np.float32)
        got = ours.run(None, {"x": x})
        want = ref.run(None, {"x": x})
        assert got[0].dtype == np.float32 and got[1].dtype == np.int64
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got[1], want[1])
        only = ours.run(["label"], {"x": x})
        assert len(only) == 1
        np.testing.assert_array_equal(only[0], want[1])


def test_results_are_the_callers_own_arrays() -> None:
    s = ortc.Session(mlp())
    a = RNG.normal(size=(1, 64)).astype(np.float32)
    b = RNG.normal(size=(1, 64)).astype(np.float32)
    first = s.run(["probabilities"], {"x": a})[0]
    kept = first.copy()
    s.run(["probabilities"], {"x": b})  # the same thread's bound output buffer is reused
    np.testing.assert_array_equal(first, kept)
    # An input that is not contiguous, and a read-only one, are accepted.
    wide = RNG.normal(size=(1, 128)).astype(np.float32)
    ro = np.frombuffer(a.tobytes(), dtype=np.float32).reshape(1, 64)
    np.testing.assert_allclose(
        s.run(["probabilities"], {"x": wide[:, ::2]})[0],
        reference(mlp()).run(["probabilities"], {"x": np.ascontiguousarray(wide[:, ::2])})[0],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(s.run(["probabilities"], {"x": ro})[0], kept)


def test_outputs_whose_shape_depends_on_values_are_run_the_long_way() -> None:
    s = ortc.Session(nonzero_model())
    for values in ([0, 1, 0, 2], [3, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 5, 0, 0]):
        x = np.asarray(values, dtype=np.float32)
        got = s.run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, np.asarray([np.flatnonzero(x)], dtype=np.int64))


def test_custom_metadata_is_read_from_the_model() -> None:
    s = ortc.Session(mlp(meta={"edgeloop.selftest": '{"labels": [1]}', "k": "v"}))
    assert s.custom_metadata("edgeloop.selftest") == '{"labels": [1]}'
    assert s.custom_metadata("k") == "v"
    assert s.custom_metadata("absent") is None


def test_errors_carry_onnx_runtimes_message() -> None:
    with pytest.raises(ortc.OrtError, match="protobuf parsing failed"):
        ortc.Session(b"\x08\x01not a model")
    s = ortc.Session(mlp())
    x = RNG.normal(size=(1, 64)).astype(np.float32)
    with pytest.raises(ortc.OrtError, match="Invalid output name"):
        s.run(["nope"], {"x": x})
    with pytest.raises(ortc.OrtError, match="(?i)invalid input name"):
        s.run(None, {"y": x})
    with pytest.raises(ortc.OrtError, match="(?i)dimensions|shape"):
        s.run(None, {"x": RNG.normal(size=(1, 63)).astype(np.float32)})
    with pytest.raises(ortc.OrtError, match="(?i)type"):
        s.run(None, {"x": x.astype(np.float64)})
    with pytest.raises(ortc.OrtError, match="unsupported dtype"):
        s.run(None, {"x": x.astype(np.complex64)})
    # After errors the session still serves, and the same thread's bound path still works.
    np.testing.assert_allclose(
        s.run(["probabilities"], {"x": x})[0],
        reference(mlp()).run(["probabilities"], {"x": x})[0],
        rtol=1e-6,
    )
    s.close()
    s.close()  # idempotent
    with pytest.raises(ortc.OrtError, match="closed"):
        s.run(None, {"x": x})


def test_threads_share_a_session() -> None:
    model = mlp(hidden=64)
    s, ref = ortc.Session(model), reference(model)
    inputs = [RNG.normal(size=(1, 64)).astype(np.float32) for _ in range(50)]
    want = [ref.run(["probabilities"], {"x": x})[0] for x in inputs]
    wrong: list[int] = []

    def work(offset: int) -> None:
        for i in range(400):
            k = (i + offset) % len(inputs)
            got = s.run(["probabilities"], {"x": inputs[k]})[0]
            if not np.allclose(got, want[k], rtol=1e-6, atol=1e-7):
                wrong.append(k)

    threads = [threading.Thread(target=work, args=(n * 7,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_building_a_session_does_not_hold_the_gil() -> None:
    """A Python thread keeps running while a large model is parsed and set up."""
    big = mlp(hidden=60_000)  # ~15 MB of weights: parsing alone takes milliseconds
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        progress = []
        for _ in range(3):
            before = counter[0]
            ortc.Session(big).close()
            progress.append(counter[0] - before)
    finally:
        stop.set()
        spinner.join()
    assert max(progress) > 0, progress


def test_a_library_that_cannot_be_loaded_is_unavailable(tmp_path) -> None:
    bogus = tmp_path / "libonnxruntime.so"
    bogus.write_bytes(b"not a shared object")
    with pytest.raises(ortc.OrtUnavailable, match="cannot load"):
        ortc._Api(str(bogus))


def test_binding_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.BINDING_ENV, raising=False)
    monkeypatch.setattr(runtime, "_resolved", {})
    assert runtime.resolve_binding("auto") == "capi"
    assert runtime.resolve_binding("python") == "python"
    monkeypatch.setenv(runtime.BINDING_ENV, "python")
    assert runtime.resolve_binding("capi") == "python"  # the environment wins
    monkeypatch.setenv(runtime.BINDING_ENV, "cuda")
    with pytest.raises(ValueError, match="must be one of"):
        runtime.resolve_binding("auto")
    monkeypatch.delenv(runtime.BINDING_ENV)

    def unavailable() -> None:
        raise ortc.OrtUnavailable("no library here")

    monkeypatch.setattr(runtime, "_resolved", {})
    monkeypatch.setattr(ortc, "load", unavailable)
    assert runtime.resolve_binding("auto") == "python"  # falls back to the package
    with pytest.raises(ortc.OrtUnavailable, match="no library here"):
        runtime.resolve_binding("capi")


@pytest.mark.parametrize("binding", ["capi", "python"])
def test_runtime_loads_self_tests_and_serves_with_either_binding(
    binding: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from device_agent.errors import SelfTestError
    from tests.device_agent.agent_testkit import (
        FEATURES,
        make_manifest,
        make_model,
        reference_probs,
        truth_label,
        with_selftest,
    )

    monkeypatch.setattr(runtime, "_resolved", {})
    monkeypatch.delenv(runtime.BINDING_ENV, raising=False)
    rt = runtime.ModelRuntime(binding=binding)
    assert rt.binding == binding
    assert runtime.runtime_version(binding) == ort.__version__
    vectors = RNG.uniform(0, 16, (8, FEATURES)).astype(np.float32)
    labels = [truth_label(3, x) for x in vectors]
    good = with_selftest(make_model(3), vectors, labels)
    path = tmp_path / "good.onnx"
    path.write_bytes(good)
    rt.swap(rt.load(path, make_manifest(good, release=1, model_version=1)))
    for x in vectors:
        raw, loaded = rt.predict(x)
        assert isinstance(loaded.session, ortc.Session) == (binding == "capi")
        np.testing.assert_allclose(raw.probabilities, reference_probs(3, x), rtol=1e-5, atol=1e-7)
    # Vectors whose labels the model does not give: the self-test refuses the bundle.
    lying = with_selftest(make_model(3), vectors, [(v + 1) % 10 for v in labels])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(lying)
    with pytest.raises(SelfTestError, match="gave another label"):
        rt.load(bad, make_manifest(lying, release=2, model_version=2))


def test_native_worker_runs_calls_on_one_lowered_thread() -> None:
    import os

    worker = runtime.NativeWorker(nice=10)
    me = threading.get_native_id()
    tid, nice = worker(
        lambda: (
            threading.get_native_id(),
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
        )
    )
    assert tid != me and nice == 10 and worker.applied == 10
    assert os.getpriority(os.PRIO_PROCESS, me) != 10  # only the worker thread was lowered
    assert worker(lambda: threading.get_native_id()) == tid  # one thread for every call
    with pytest.raises(ZeroDivisionError):
        worker(lambda: 1 / 0)
    assert worker(lambda: worker(lambda: 5)) == 5  # a call from the worker itself runs inline

    calls: list[str] = []

    def counting(fn):  # noqa: ANN001, ANN202
        calls.append(threading.current_thread().name)
        return worker(fn)

    model = mlp()
    s = ortc.Session(model, native=counting)
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(
        s.run(["probabilities"], {"x": x})[0],
        reference(model).run(["probabilities"], {"x": x})[0],
        rtol=1e-6,
    )
    s.close()
    assert len(calls) == 2  # the build and the free went through the worker
    assert runtime.native_worker(0) is None
    assert runtime.native_worker(19) is runtime.native_worker(19)


def test_a_session_builds_from_a_file_path(tmp_path) -> None:
    model = mlp(meta={"k": "v"})
    path = tmp_path / "model with spaces é.onnx"
    path.write_bytes(model)
    s = ortc.Session(path)
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(
        s.run(["probabilities"], {"x": x})[0],
        reference(model).run(["probabilities"], {"x": x})[0],
        rtol=1e-6,
    )
    assert s.custom_metadata("k") == "v"
    with pytest.raises(ortc.OrtError, match="(?i)no such file|load model|open"):
        ortc.Session(tmp_path / "missing.onnx")
