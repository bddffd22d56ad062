"""Agent benchmark: hot swap under load, memory across swaps, and the agent's footprint.

    .venv/bin/python -m benchmarks.agent_bench [--swaps 1000] [--threads 2]

Runs the agent's real serving path (``ModelRuntime.predict``, the same call ``Agent.predict``
makes) on inference threads that never pause, first for a steady-state baseline, then while a
swapper thread performs ``--swaps`` hot swaps exactly as the updater does: build and warm a new
session off the serving path, swap the reference, release the retired session once no in-flight
call holds it. The pause a swap imposes is measured where it is felt: the latency of every
inference in flight while a swap runs (load, flip, release), against steady-state inferences of the
same run as the noise floor; the time the flip and the destructor hold the GIL is reported beside.
Before that, ``benchmarks.agent_footprint`` starts real Agents in fresh processes and reports
resident memory and import-to-serving time (cold and warm page cache; see that module). Prints a
table with PASS/FAIL per target; exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import threading
import time
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.agent_footprint import Row, footprint_rows, print_rows

if TYPE_CHECKING:
    import numpy as np

FEATURES, HIDDEN, CLASSES = 64, 128, 10


def digits_mlp(seed: int) -> bytes:
    """A digits-shaped MLP (Gemm-Relu-Gemm-Softmax); ``seed`` changes weights and bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (FEATURES, HIDDEN)).astype(np.float32), "W1"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "B1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (HIDDEN, CLASSES)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "B2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "W1", "B1"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "W2", "B2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        f"digits_mlp_{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_for(data: bytes, release: int):  # noqa: ANN201 - contract type, imported lazily
    import hashlib

    from contract.manifest import ArtifactRef, InputSpec, Manifest

    now = datetime.now(UTC)
    return Manifest(
        model_line="digits",
        release=release,
        model_version=release,
        artifact=ArtifactRef("model.onnx", hashlib.sha256(data).hexdigest(), len(data)),
        input_spec=InputSpec(name="input", shape=(-1, FEATURES), dtype="float32", min=0, max=16),
        labels=tuple(str(i) for i in range(CLASSES)),
        created_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(days=30),
    )


def write_installed_state(workdir: Path) -> tuple[Path, Path]:
    """Write what an Agent resumes at start: a signed digits model installed in the current slot.

    Returns the state directory and the PEM file of the public key that signed the manifest
    (generated here; signing needs ``cryptography``, which only the harness imports).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.store import InstallRecord, ModelStore, PersistedState

    key = Ed25519PrivateKey.generate()
    pub = workdir / "key.pub.pem"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    data = digits_mlp(7)
    manifest = manifest_for(data, 1)
    store = ModelStore(workdir / "agent")
    store.model_path(manifest.artifact.sha256).write_bytes(data)
    store.save_state(
        PersistedState(
            current=InstallRecord(
                envelope=manifest.sign([key]).to_dict(),
                sha256=manifest.artifact.sha256,
                model_version=1,
                release=1,
            ),
            highest_release=1,
        )
    )
    return workdir / "agent", pub


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- swap under load -------------------------------------------------------------------------
def swap_bench(
    workdir: Path,
    swaps: int,
    threads: int,
    steady_s: float,
    gap_s: float,
    binding: str = "auto",
    build_nice: int | None = None,
    rounds: int = 4,
) -> list[Row]:
    import numpy as np

    from device_agent.config import AgentConfig
    from device_agent.runtime import ModelRuntime, freeze_heap, tune_interpreter

    # The settings an Agent with the default config uses (switch interval, session options).
    defaults = AgentConfig(device_id="bench", model_line="digits")
    tune_interpreter(defaults.switch_interval_s)

    paths, manifests = [], []
    for i in range(2):
        data = digits_mlp(i)
        p = workdir / f"m{i}.onnx"
        p.write_bytes(data)
        paths.append(p)
        manifests.append(manifest_for(data, i + 1))
    rt = ModelRuntime(
        intra_op_num_threads=1,
        graph_optimization=defaults.graph_optimization,
        binding=binding,
        build_nice=defaults.build_nice if build_nice is None else build_nice,
    )
    alive: set[int] = set()
    alive_max = 0
    alive_lock = threading.Lock()

    def track(loaded: object) -> None:
        nonlocal alive_max
        key = id(loaded)
        with alive_lock:
            alive.add(key)
            alive_max = max(alive_max, len(alive))

        def gone() -> None:
            with alive_lock:
                alive.discard(key)

        weakref.finalize(loaded, gone)

    first = rt.load(paths[0], manifests[0])
    track(first)
    rt.swap(first, retire=True)
    del first
    # What a full collection costs (the GIL is held throughout) before and after the freeze the
    # Agent does once it serves: the same-run baseline for the GC rows below.
    g0 = time.perf_counter()
    gc.collect()
    full_gc_before_ms = (time.perf_counter() - g0) * 1000
    freeze_heap()
    g0 = time.perf_counter()
    gc.collect()
    full_gc_after_ms = (time.perf_counter() - g0) * 1000
    stop = threading.Event()
    phase = {"name": "warmup"}
    cap = 3_000_000  # records per thread and phase, pre-touched so recording does not grow RSS
    bufs = [
        {k: np.ones((cap, 2), dtype=np.float64) for k in ("steady", "swaps")}
        for _ in range(threads)
    ]
    counts = [{"steady": 0, "swaps": 0} for _ in range(threads)]
    failures: list[str] = []
    x = np.random.default_rng(0).uniform(0, 16, FEATURES).astype(np.float32)

    def infer(idx: int) -> None:
        buf, cnt = bufs[idx], counts[idx]
        clock = time.perf_counter
        while not stop.is_set():
            name = phase["name"]
            t0 = clock()
            try:
                rt.predict(x)
            except Exception as exc:  # any failure counts
                failures.append(repr(exc))
                continue
            t1 = clock()
            if name in cnt and cnt[name] < cap:
                buf[name][cnt[name]] = (t0, t1)
                cnt[name] += 1

    workers = [threading.Thread(target=infer, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    # Per swap, wall-clock windows (perf_counter seconds) of its three steps: load (build + warm
    # the new session), flip (swap the reference), release (destroy the retired session).
    windows: list[tuple[float, float, float, float, float, float]] = []
    free_wall: list[float] = []  # wall seconds the destructor took (python binding: GIL held)
    rss_peak = rss_after = 0
    base_rss = rss_bytes()
    # The first swap, before the measured ones: memory after it is the baseline for growth. Its
    # gc.collect() runs here, outside every measured window (a full collection holds the GIL).
    warm = rt.load(paths[1], manifests[1])
    track(warm)
    rt.swap(warm, retire=True)
    del warm
    rt.release_retired(5.0)
    gc.collect()
    rss_first = rss_bytes()
    # Garbage collections during the measured phases: a collection holds the GIL throughout.
    gc_ms: list[float] = []
    gc_t0 = [0.0]

    def on_gc(stage: str, info: dict) -> None:
        if stage == "start":
            gc_t0[0] = time.perf_counter()
        elif phase["name"] in ("steady", "swaps"):
            gc_ms.append((time.perf_counter() - gc_t0[0]) * 1000)

    gc.callbacks.append(on_gc)
    # Steady and swap phases interleave, so neighbours' load hits both alike.
    swap_s = 0.0
    steady_next = steady_s / rounds
    for r in range(rounds):
        phase["name"] = "steady"
        time.sleep(steady_next)
        phase["name"] = "swaps"
        t_start = time.perf_counter()
        for i in range(r * swaps // rounds, (r + 1) * swaps // rounds):
            which = i % 2  # the warm-up swap left model 1 serving
            l0 = time.perf_counter()
            loaded = rt.load(paths[which], manifests[which])  # off the serving path
            l1 = time.perf_counter()
            track(loaded)
            rss_peak = max(rss_peak, rss_bytes())
            f0 = time.perf_counter()
            rt.swap(loaded, retire=True)
            f1 = time.perf_counter()
            del loaded
            r0 = time.perf_counter()
            rt.release_retired(5.0)  # waits for in-flight calls, then frees them off the path
            r1 = time.perf_counter()
            windows.append((l0, l1, f0, f1, r0, r1))
            free_wall.append(rt.last_free_wall_s)
            if gap_s:
                time.sleep(gap_s)
        block_s = time.perf_counter() - t_start
        swap_s += block_s
        # The next steady phase lasts as long as this swap block: the floor gets as many samples.
        steady_next = max(steady_s / rounds, block_s)
    phase["name"] = "done"
    gc.callbacks.remove(on_gc)
    gc.collect()
    rss_after = rss_bytes()
    time.sleep(0.05)
    stop.set()
    for w in workers:
        w.join()

    def gather(name: str) -> np.ndarray:
        return np.concatenate([b[name][: c[name]] for b, c in zip(bufs, counts, strict=True)])

    st, sw = gather("steady"), gather("swaps")
    steady = (st[:, 1] - st[:, 0]) * 1000
    during = (sw[:, 1] - sw[:, 0]) * 1000
    p50_s, p99_s = np.percentile(steady, 50), np.percentile(steady, 99)
    p99_d = np.percentile(during, 99)
    # The pause an inference sees from a swap: the latency of every inference in flight while a
    # swap ran (from the start of its load to the end of its release), minus the steady median.
    # The same excess over steady-state inferences (same count, drawn at random) is the noise
    # floor of this machine: a pause the swap causes shows up as the difference between the two.
    win = np.asarray(windows)
    order = np.argsort(win[:, 0])
    w_start, w_end = win[order, 0], win[order, 5]
    lat_sw = (sw[:, 1] - sw[:, 0]) * 1000
    k = np.searchsorted(w_start, sw[:, 1], side="right") - 1  # last swap starting before the end
    hit = (k >= 0) & (w_end[np.maximum(k, 0)] >= sw[:, 0])
    at_swap = lat_sw[hit] - p50_s
    rng = np.random.default_rng(1)
    floor = rng.choice(steady, size=min(at_swap.size, steady.size), replace=False) - p50_s
    q = 99.9
    pause_q, pause_max = float(np.percentile(at_swap, q)), float(at_swap.max())
    floor_q, floor_max = float(np.percentile(floor, q)), float(floor.max())
    flip_ms = (win[:, 3] - win[:, 2]) * 1000
    free_ms = np.asarray(free_wall) * 1000
    load_ms = (win[:, 1] - win[:, 0]) * 1000
    growth = (rss_after - rss_first) / rss_first
    mib = 1024 * 1024
    return [
        Row(
            "ONNX Runtime binding",
            rt.binding
            + (
                f", builds and frees at nice {rt.build_thread_nice}"
                if rt.build_thread_nice is not None
                else ""
            ),
            "",
            None,
        ),
        Row("swaps performed", f"{swaps} in {swap_s:.1f} s", ">= 1000", swaps >= 1000),
        Row(
            "inferences (steady / during swaps)",
            f"{steady.size} / {during.size} on {threads} threads",
            "",
            None,
        ),
        Row("failed inferences", str(len(failures)), "0", not failures),
        Row(
            "inference pause from a swap (p99.9 / max)",
            f"{pause_q:.3f} / {pause_max:.3f} ms over {at_swap.size} inferences in flight at a "
            f"swap (noise floor, same count at steady state: {floor_q:.3f} / {floor_max:.3f} ms)",
            "< 1 ms",
            pause_max < 1.0,
        ),
        Row(
            "flip / freeing the old session, wall (p99.9 / max)",
            f"{np.percentile(flip_ms, q):.3f} / {flip_ms.max():.3f} ms; "
            f"{np.percentile(free_ms, q):.3f} / {free_ms.max():.3f} ms "
            + (
                "(the free runs without the GIL on the build thread)"
                if rt.binding == "capi"
                else "(the free holds the GIL throughout)"
            ),
            "",
            None,
        ),
        Row(
            "garbage collections during the run, longest",
            f"{len(gc_ms)} collections, longest {max(gc_ms, default=0.0):.3f} ms; a full "
            f"collection takes {full_gc_before_ms:.1f} ms before gc.freeze(), "
            f"{full_gc_after_ms:.2f} ms after (the agent freezes once serving)",
            "",
            None,
        ),
        Row(
            "load (build + warm) off the path, p50 / max",
            f"{np.percentile(load_ms, 50):.3f} / {load_ms.max():.3f} ms",
            "",
            None,
        ),
        Row(
            "p50 latency steady / during",
            f"{p50_s:.3f} / {np.percentile(during, 50):.3f} ms",
            "",
            None,
        ),
        Row(
            "p99 latency steady / during",
            f"{p99_s:.3f} / {p99_d:.3f} ms (ratio {p99_d / p99_s:.2f})",
            "ratio <= 1.5",
            p99_d / p99_s <= 1.5,
        ),
        Row(
            "RSS after 1st / after last swap",
            f"{rss_first / mib:.1f} / {rss_after / mib:.1f} MiB ({growth * 100:+.1f}%)",
            "within 10%",
            abs(growth) <= 0.10,
        ),
        Row(
            "models alive at once (max)",
            f"{alive_max}; RSS peak during swaps {rss_peak / mib:.1f} MiB "
            f"(+{(rss_peak - base_rss) / mib:.1f} MiB over serving one)",
            "<= 2 (old + new)",
            alive_max <= 2,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agent_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="inference threads")
    ap.add_argument("--steady-s", type=float, default=4.0, help="seconds of steady baseline")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="pause between swaps (ms)")
    ap.add_argument(
        "--binding",
        choices=("auto", "capi", "python"),
        default="auto",
        help="ONNX Runtime binding under test (auto: what an agent picks)",
    )
    ap.add_argument(
        "--baseline",
        choices=("python", "none"),
        default="python",
        help="also run the swap benchmark with this binding, same run, rows marked [baseline]",
    )
    ap.add_argument(
        "--build-nice", type=int, default=None, help="capi build thread nice (default: config)"
    )
    ap.add_argument("--rounds", type=int, default=4, help="steady/swap phase pairs, interleaved")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        work = Path(tmp)
        # Footprint first: this process has not mapped numpy or onnxruntime yet, so the cold
        # starts really find the agent's libraries out of the page cache.
        (work / "footprint").mkdir()
        rows = footprint_rows(work / "footprint")
        gap = args.gap_ms / 1000
        swap = swap_bench(
            work,
            args.swaps,
            args.threads,
            args.steady_s,
            gap,
            args.binding,
            args.build_nice,
            args.rounds,
        )
        rows = swap + rows
        if args.baseline != "none":
            (work / "baseline").mkdir()
            base = swap_bench(
                work / "baseline",
                args.swaps,
                args.threads,
                args.steady_s,
                gap,
                args.baseline,
                rounds=args.rounds,
            )
            rows += [Row(f"[baseline] {r.name}", r.value, "", None) for r in base]
    return 0 if print_rows(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
