"""Hot swap under load: zero failed inferences, every answer from the old or the new model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from device_agent.errors import ModelLoadError, NoModelError
from device_agent.runtime import ModelRuntime
from tests.device_agent.agent_testkit import (
    FEATURES,
    FakeServer,
    Rig,
    make_manifest,
    make_model,
    make_target,
    reference_probs,
    wait_until,
)

SEEDS = {1: 1, 2: 2}  # model_version -> weight seed


def test_predict_before_any_model_raises() -> None:
    with pytest.raises(NoModelError):
        ModelRuntime().predict(np.zeros(FEATURES, dtype=np.float32))


def test_load_rejects_wrong_output_shape(tmp_path) -> None:
    data = make_model(1)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    manifest = make_manifest(data, release=1, model_version=1)
    bad = type(manifest)(**{**manifest.__dict__, "labels": ("a", "b", "c")})
    with pytest.raises(ModelLoadError):
        ModelRuntime().load(path, bad)


def test_hot_swap_while_four_threads_predict(rig: Rig, fake_server: FakeServer) -> None:
    m1, m2 = make_model(SEEDS[1]), make_model(SEEDS[2])
    t1 = make_target(
        make_manifest(m1, release=1, model_version=1), rig.key, fake_server.add("m1.onnx", m1)
    )
    assert rig.updater.handle_target(t1).value == "committed"

    rng = np.random.default_rng(0)
    inputs = rng.uniform(0, 16, (32, FEATURES)).astype(np.float32)
    expected = {v: [reference_probs(s, x) for x in inputs] for v, s in SEEDS.items()}
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: dict[int, int] = {1: 0, 2: 0}
    lock = threading.Lock()

    def hammer(worker: int) -> None:
        i = worker
        while not stop.is_set():
            try:
                raw, loaded = rig.runtime.predict(inputs[i % len(inputs)])
                want = expected[loaded.model_version][i % len(inputs)]
                assert raw.label == int(np.argmax(want))
                np.testing.assert_allclose(raw.probabilities, want, rtol=1e-4, atol=1e-5)
                with lock:
                    seen[loaded.model_version] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: seen[1] > 200)
        t2 = make_target(
            make_manifest(m2, release=2, model_version=2), rig.key, fake_server.add("m2.onnx", m2)
        )
        assert rig.updater.handle_target(t2).value == "committed"
        wait_until(lambda: seen[2] > 200 or errors)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert seen[1] > 0 and seen[2] > 0
    assert rig.serving_version() == 2


# ---- the garbage collector off the swap's path ------------------------------------------------
FREEZE_PROBE = """
import gc, json
from device_agent.runtime import freeze_heap
class Node:
    pass
before = gc.get_freeze_count()
first, second = freeze_heap(), freeze_heap()
frozen = gc.get_freeze_count()
# A cycle made after the freeze is still collected.
a, b = Node(), Node()
a.b, b.a = b, a
del a, b
found = gc.collect()
print(json.dumps([before, first, second, frozen, found]))
"""


def test_freeze_heap_acts_once_and_later_cycles_are_still_collected() -> None:
    import json

    from tests.conftest import run_python

    out = run_python(FREEZE_PROBE, timeout=60)
    before, first, second, frozen, found = json.loads(out.stdout)
    assert before == 0 and first is True and second is False
    assert frozen > 10_000  # numpy, onnxruntime and the standard library's objects
    assert found >= 2
