"""Agent benchmark: what a hot swap costs an inference, memory across swaps, and the footprint.

    .venv/bin/python -m benchmarks.agent_bench [--swaps 1000] [--rounds 5] [--threads N]

A device leaves its updater a core and infers on the others, so ``--threads`` (default: every
core but one, at least one) inference threads call the agent's real serving path
(``ModelRuntime.predict``, what ``Agent.predict`` calls) without pause, while ``--rounds``
rounds each perform ``swaps / rounds`` hot swaps as the updater does them (build and warm the new
session off the serving path, swap the reference, release the retired session once no in-flight
call holds it, then ``--gap-ms``), each swap followed by a steady slice (no swap) as long as it.
The swap and steady phases of a round thus interleave every few milliseconds, and a neighbour's
burst on a shared machine lands on both alike; within each round the two phases are compared
over the same number of inferences (the larger one subsampled at random).

Judged on the median over rounds (a noisy neighbour hits a round, not the median; every round
is printed): swap-phase p99 within 1.5x of steady p99; swap-phase p99.9 within 1 ms of steady
p99.9; no failed inference over >= 1,000 swaps; RSS after the last swap within 10 % of RSS after
the first (the harness's own latency buffers subtracted). The same run then repeats with every
core inferring, for information: the updater then competes with inference for a core.

Control arms (``--no-controls`` skips them), printed as information: after each swap's steady
slice, one slice per arm, each followed by the same gap, compared with the round's steady phase
as the swap is. The updater burns the swap's CPU time in C with the GIL released (what the
machine alone does to the inference on the other core), or in a pure-Python loop (GIL contention
alone); builds a session only; checks and warms it up only; frees it only; only flips to a
session built and warmed up before the slice (flipping back and freeing it after the slice,
unmeasured); or does nothing (how far the ratio strays from 1 by chance).

Before that, ``benchmarks.agent_footprint`` starts real Agents in fresh processes and reports
resident memory and import-to-serving time (cold and warm page cache; see that module). Prints a
table with PASS/FAIL per target; exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.agent_footprint import Row, footprint_rows, print_rows

if TYPE_CHECKING:
    import numpy as np

P99_RATIO_LIMIT = 1.5  # swap-phase p99 / steady p99, median round
P999_DELTA_LIMIT_MS = 1.0  # swap-phase p99.9 - steady p99.9, median round
RSS_GROWTH_LIMIT = 0.10  # RSS after the last swap vs after the first
MIN_SWAPS = 1000

FEATURES, HIDDEN, CLASSES = 64, 128, 10

# Phases of a round, after its steady (0) and swap (1) slices: the control arms, printed as
# information. Each runs in every swap's iteration, right after the steady slice, followed by
# the same gap, so a neighbour's burst lands on them as on the judged phases.
CONTROL_ARMS = (
    # The updater burns the swap's CPU time in one C call that releases the GIL (sha256 over a
    # buffer): what the machine alone (shared caches, memory, the host's cores) does to an
    # inference on the other core.
    "C work, GIL released",
    # The same CPU time in a pure-Python loop: GIL contention alone (the loop lets go of the GIL
    # every switch interval when the inference thread asks for it).
    "Python loop, GIL held",
    # The swap in its parts, one per slice: ONNX Runtime's session build; the checks, warm-up
    # run and self-test on the built session; freeing it (destructor and malloc_trim).
    "build only",
    "warm-up + checks only",
    "release + malloc_trim only",
    # Only the flip to a session built and warmed up before the slice (the flip back and the
    # release come after it, unmeasured): the new session's first inferences on the serving core.
    "flip only",
    # Nothing at all, like steady: how far the ratio strays from 1 by chance.
    "idle (null arm)",
)
STEADY, SWAP = 0, 1
HASH_BUFFER = 16 * 1024 * 1024  # bytes the C-work arm hashes from (at most one pass a slice)


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


def usable_cores() -> int:
    """Cores this process may run on (affinity and cgroup cpusets included)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---- swap under load -------------------------------------------------------------------------
@dataclass
class RoundStats:
    """One steady phase and the swap phase after it, compared over ``n`` inferences each."""

    n: int
    p99_steady: float  # ms
    p99_swap: float
    p999_steady: float
    p999_swap: float

    @property
    def ratio(self) -> float:
        return self.p99_swap / self.p99_steady

    @property
    def delta(self) -> float:
        return self.p999_swap - self.p999_steady


class _Judged:
    """The verdict figures of a run or arm: medians over its rounds."""

    rounds: list[RoundStats]

    @property
    def median_ratio(self) -> float:
        return statistics.median(r.ratio for r in self.rounds)

    @property
    def median_delta(self) -> float:
        return statistics.median(r.delta for r in self.rounds)


@dataclass
class ArmRun(_Judged):
    """A control arm's rounds, each against the same round's steady phase."""

    name: str
    rounds: list[RoundStats]
    cpu_ms: float  # updater CPU per slice, median (the swap's, for the two duty-cycle arms)


@dataclass
class SwapRun(_Judged):
    threads: int
    rounds: list[RoundStats]
    swaps: int
    swap_s: float
    inferences: int
    failures: list[str]
    dropped: int  # inferences not recorded (buffers full): the figures cover the rest
    rss_first: int  # bytes, harness buffers excluded
    rss_after: int
    rss_peak: int
    alive_max: int
    load_ms: np.ndarray
    flip_ms: np.ndarray
    free_ms: np.ndarray
    pause: tuple[float, float, float, float, int]  # p99.9, max, floor p99.9, floor max, count
    gc_count: int
    gc_longest_ms: float
    full_gc_ms: tuple[float, float]  # before / after gc.freeze()
    swap_cpu_ms: float  # updater CPU per swap, median
    arms: list[ArmRun]  # control arms; empty without controls

    @property
    def growth(self) -> float:
        return (self.rss_after - self.rss_first) / self.rss_first


def hash_rate() -> float:
    """Bytes per CPU second sha256 hashes here, in one call on one thread (best of five)."""
    buf = memoryview(bytes(4 * 1024 * 1024))
    best = 0.0
    for _ in range(5):
        c0 = time.thread_time()
        hashlib.sha256(buf)
        best = max(best, len(buf) / max(time.thread_time() - c0, 1e-6))
    return best


def swap_bench(
    workdir: Path,
    *,
    swaps: int,
    threads: int,
    rounds: int,
    gap_s: float,
    controls: bool = False,
    cap_per_phase: int = 1_000_000,
) -> SwapRun:
    """Run ``rounds`` steady / swap rounds with ``threads`` inference threads (see the module
    docstring), with the control arms in each iteration if ``controls``; ``cap_per_phase`` x
    the phases of a round bounds the inferences recorded per thread."""
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
        intra_op_num_threads=defaults.intra_op_num_threads,
        graph_optimization=defaults.graph_optimization,
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

    windows: list[tuple[float, float, float, float, float, float]] = []
    free_wall: list[float] = []

    def one_swap(i: int) -> None:
        which = i % 2
        l0 = time.perf_counter()
        loaded = rt.load(paths[which], manifests[which])  # off the serving path
        l1 = time.perf_counter()
        track(loaded)
        f0 = time.perf_counter()
        rt.swap(loaded, retire=True)
        f1 = time.perf_counter()
        del loaded
        r0 = time.perf_counter()
        rt.release_retired(5.0)  # waits for in-flight calls, then frees them off the path
        r1 = time.perf_counter()
        windows.append((l0, l1, f0, f1, r0, r1))
        free_wall.append(rt.last_free_wall_s)

    first = rt.load(paths[0], manifests[0])
    track(first)
    rt.swap(first, retire=True)
    del first
    # What a full collection costs (the GIL is held throughout) before and after the freeze the
    # Agent does once it serves.
    g0 = time.perf_counter()
    gc.collect()
    gc_before = (time.perf_counter() - g0) * 1000
    freeze_heap()
    g0 = time.perf_counter()
    gc.collect()
    gc_after = (time.perf_counter() - g0) * 1000

    # Per thread: end time and latency of each inference, and its phase (arms * round + arm:
    # STEADY, SWAP, then the control arms; -1 outside the measured phases). Written in place,
    # pre-touched: recording does not grow RSS, and the buffers' bytes are subtracted from the
    # RSS figures.
    arms = 2 + (len(CONTROL_ARMS) if controls else 0)
    cap = cap_per_phase * arms
    ends = [np.ones(cap) for _ in range(threads)]
    lats = [np.ones(cap) for _ in range(threads)]
    tags = [np.full(cap, -1, dtype=np.int16) for _ in range(threads)]
    harness = sum(e.nbytes + v.nbytes + t.nbytes for e, v, t in zip(ends, lats, tags, strict=True))
    rate = hash_rate()
    hash_buf = memoryview(np.random.default_rng(2).bytes(HASH_BUFFER if controls else 0))
    harness += len(hash_buf)
    pending: list[Any] = []  # the session the part arms build, check, then free

    def c_work(cpu_s: float, which: int) -> None:
        hashlib.sha256(hash_buf[: min(len(hash_buf), int(cpu_s * rate))])  # GIL released

    def python_work(cpu_s: float, which: int) -> None:
        end_cpu = time.thread_time() + cpu_s
        while time.thread_time() < end_cpu:
            pass

    def build_part(cpu_s: float, which: int) -> None:
        pending.append(rt.build(paths[which]))

    def prepare_part(cpu_s: float, which: int) -> None:
        pending.append(rt.prepare(pending.pop(), manifests[which]))

    def release_part(cpu_s: float, which: int) -> None:
        rt.retire(pending.pop())
        rt.release_retired(5.0)

    def flip_before(which: int) -> None:
        pending.append(rt.load(paths[which], manifests[which]))

    def flip_part(cpu_s: float, which: int) -> None:
        pending.append(rt.swap(pending.pop()))  # keeps the replaced model: it comes back after

    def flip_after(which: int) -> None:
        rt.swap(pending.pop(), retire=True)
        rt.release_retired(5.0)
        time.sleep(gap_s / 5)  # the restored session's first inferences stay unmeasured too

    def idle(cpu_s: float, which: int) -> None:
        pass

    control_work = (c_work, python_work, build_part, prepare_part, release_part, flip_part, idle)
    assert len(control_work) == len(CONTROL_ARMS)
    unmeasured = {flip_part: (flip_before, flip_after)}  # around the arm's slice, phase -1
    arm_cpu: list[list[float]] = [[] for _ in control_work]
    swap_cpu: list[float] = []
    counts = [0] * threads
    dropped = [0] * threads
    phase = [-1]
    stop = threading.Event()
    failures: list[str] = []
    x = np.random.default_rng(0).uniform(0, 16, FEATURES).astype(np.float32)

    def infer(idx: int) -> None:
        end, lat, tag = ends[idx], lats[idx], tags[idx]
        clock = time.perf_counter
        n = 0
        while not stop.is_set():
            ph = phase[0]
            t0 = clock()
            try:
                rt.predict(x)
            except Exception as exc:  # any failure counts
                failures.append(repr(exc))
                continue
            t1 = clock()
            if ph >= 0:
                if n < cap:
                    end[n], lat[n], tag[n] = t1, t1 - t0, ph
                    n += 1
                    counts[idx] = n
                else:
                    dropped[idx] += 1

    workers = [threading.Thread(target=infer, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    # Warm-up swaps, unmeasured: the first one's memory is the baseline for growth.
    warm = 20
    for i in range(1, warm + 1):
        one_swap(i)
    windows.clear()
    free_wall.clear()
    gc.collect()
    rss_first, rss_peak = rss_bytes(), 0
    gc_ms: list[float] = []
    gc_t0 = [0.0]

    def on_gc(stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            gc_t0[0] = time.perf_counter()
        elif phase[0] >= 0:
            gc_ms.append((time.perf_counter() - gc_t0[0]) * 1000)

    gc.callbacks.append(on_gc)
    swap_s = 0.0
    for r in range(rounds):
        # Within a round, each swap slice (the swap and the gap after it) is followed by a
        # steady slice as long, then by one slice of each control arm: a neighbour's burst
        # lands on all phases alike.
        for i in range(r * swaps // rounds, (r + 1) * swaps // rounds):
            phase[0] = arms * r + SWAP
            t_start, c_start = time.perf_counter(), time.thread_time()
            one_swap(warm + 1 + i)
            cpu_s = time.thread_time() - c_start
            swap_cpu.append(cpu_s)
            if gap_s:
                time.sleep(gap_s)
            slice_s = time.perf_counter() - t_start
            swap_s += slice_s
            phase[0] = arms * r + STEADY
            t_steady = time.perf_counter()
            rss_peak = max(rss_peak, rss_bytes())
            time.sleep(max(0.0, slice_s - (time.perf_counter() - t_steady)))
            for k, work in enumerate(control_work[: arms - 2]):
                before, after = unmeasured.get(work, (None, None))
                if before:
                    phase[0] = -1
                    before((warm + 1 + i) % 2)
                phase[0] = arms * r + 2 + k
                c0 = time.thread_time()
                work(cpu_s, (warm + 1 + i) % 2)
                arm_cpu[k].append(time.thread_time() - c0)
                if gap_s:
                    time.sleep(gap_s)
                if after:
                    phase[0] = -1
                    after((warm + 1 + i) % 2)
    phase[0] = -1
    gc.callbacks.remove(on_gc)
    gc.collect()
    rss_after = rss_bytes()
    time.sleep(0.05)
    stop.set()
    for w in workers:
        w.join()

    end = np.concatenate([e[:c] for e, c in zip(ends, counts, strict=True)])
    lat = np.concatenate([v[:c] for v, c in zip(lats, counts, strict=True)]) * 1000
    tag = np.concatenate([t[:c] for t, c in zip(tags, counts, strict=True)])
    rng = np.random.default_rng(1)

    def versus_steady(arm: int) -> list[RoundStats]:
        stats = []
        for r in range(rounds):
            st, sw = lat[tag == arms * r + STEADY], lat[tag == arms * r + arm]
            n = min(st.size, sw.size)
            st = rng.choice(st, n, replace=False) if st.size > n else st
            sw = rng.choice(sw, n, replace=False) if sw.size > n else sw
            stats.append(
                RoundStats(
                    n,
                    float(np.percentile(st, 99)),
                    float(np.percentile(sw, 99)),
                    float(np.percentile(st, 99.9)),
                    float(np.percentile(sw, 99.9)),
                )
            )
        return stats

    stats = versus_steady(SWAP)
    arm_runs = [
        ArmRun(name, versus_steady(2 + k), float(np.median(arm_cpu[k])) * 1000)
        for k, name in enumerate(CONTROL_ARMS[: arms - 2])
    ]
    # Informational: the excess latency of every inference in flight while a swap ran (load,
    # flip or release) over the steady median, against steady inferences as the noise floor.
    win = np.asarray(windows)
    order = np.argsort(win[:, 0])
    w_start, w_end = win[order, 0], win[order, 5]
    swap_rows = tag % arms == SWAP
    sw_end, sw_lat = end[swap_rows], lat[swap_rows]
    k = np.searchsorted(w_start, sw_end, side="right") - 1
    hit = (k >= 0) & (w_end[np.maximum(k, 0)] >= sw_end - sw_lat / 1000)
    steady = lat[tag % arms == STEADY]
    p50 = float(np.percentile(steady, 50))
    at_swap = sw_lat[hit] - p50
    floor = rng.choice(steady, min(at_swap.size, steady.size), replace=False) - p50
    pause = (
        float(np.percentile(at_swap, 99.9)),
        float(at_swap.max()),
        float(np.percentile(floor, 99.9)),
        float(floor.max()),
        int(at_swap.size),
    )
    return SwapRun(
        threads=threads,
        rounds=stats,
        swaps=len(windows),
        swap_s=swap_s,
        inferences=int(lat.size),
        failures=failures,
        dropped=sum(dropped),
        rss_first=rss_first - harness,
        rss_after=rss_after - harness,
        rss_peak=rss_peak - harness,
        alive_max=alive_max,
        load_ms=(win[:, 1] - win[:, 0]) * 1000,
        flip_ms=(win[:, 3] - win[:, 2]) * 1000,
        free_ms=np.asarray(free_wall) * 1000,
        pause=pause,
        gc_count=len(gc_ms),
        gc_longest_ms=max(gc_ms, default=0.0),
        full_gc_ms=(gc_before, gc_after),
        swap_cpu_ms=float(np.median(swap_cpu)) * 1000,
        arms=arm_runs,
    )


def judged_rows(run: SwapRun, cores: int) -> list[Row]:
    """The targets, on the run that leaves the updater a core."""
    import numpy as np

    mib = 1024 * 1024
    per_round = ", ".join(f"{r.ratio:.2f}" for r in run.rounds)
    per_delta = ", ".join(f"{r.delta:+.3f}" for r in run.rounds)
    med = min(run.rounds, key=lambda r: abs(r.ratio - run.median_ratio))
    return [
        Row(
            "inference threads / cores",
            f"{run.threads} / {cores} (the updater keeps a core)",
            "",
            None,
        ),
        Row(
            "swaps performed",
            f"{run.swaps} in {run.swap_s:.1f} s, {len(run.rounds)} rounds",
            f">= {MIN_SWAPS}",
            run.swaps >= MIN_SWAPS,
        ),
        Row(
            "inferences recorded",
            f"{run.inferences}"
            + (f" ({run.dropped} beyond the buffers, unrecorded)" if run.dropped else ""),
            "",
            None,
        ),
        Row("failed inferences", str(len(run.failures)), "0", not run.failures),
        Row(
            "p99 swap / steady, median round",
            f"{run.median_ratio:.2f} (rounds: {per_round}); median round "
            f"{med.p99_swap:.3f} / {med.p99_steady:.3f} ms over {med.n} inferences each",
            f"<= {P99_RATIO_LIMIT}",
            run.median_ratio <= P99_RATIO_LIMIT,
        ),
        Row(
            "p99.9 swap - steady, median round",
            f"{run.median_delta:+.3f} ms (rounds: {per_delta} ms)",
            f"<= {P999_DELTA_LIMIT_MS:g} ms",
            run.median_delta <= P999_DELTA_LIMIT_MS,
        ),
        Row(
            "RSS after 1st / after last swap",
            f"{run.rss_first / mib:.1f} / {run.rss_after / mib:.1f} MiB "
            f"({run.growth * 100:+.1f}%; peak {run.rss_peak / mib:.1f} MiB)",
            f"within {RSS_GROWTH_LIMIT:.0%}",
            abs(run.growth) <= RSS_GROWTH_LIMIT,
        ),
        Row(
            "models alive at once (max)", str(run.alive_max), "<= 2 (old + new)", run.alive_max <= 2
        ),
        Row(
            "  excess latency in flight at a swap (p99.9 / max)",
            f"{run.pause[0]:.3f} / {run.pause[1]:.3f} ms over {run.pause[4]} inferences "
            f"(steady floor, same count: {run.pause[2]:.3f} / {run.pause[3]:.3f} ms)",
            "",
            None,
        ),
        Row(
            "  load off the path p50 / max; flip max; free max",
            f"{np.percentile(run.load_ms, 50):.2f} / {run.load_ms.max():.2f} ms; "
            f"{run.flip_ms.max():.3f} ms; {run.free_ms.max():.2f} ms",
            "",
            None,
        ),
        Row(
            "  garbage collections in the phases",
            f"{run.gc_count}, longest {run.gc_longest_ms:.2f} ms (a full collection: "
            f"{run.full_gc_ms[0]:.1f} ms before gc.freeze(), {run.full_gc_ms[1]:.2f} ms after)",
            "",
            None,
        ),
    ]


def control_rows(run: SwapRun) -> list[Row]:
    """The control arms of the judged run, against the same steady phase: information."""
    if not run.arms:
        return []
    rows = [
        Row(
            "  control arms vs steady (median round)",
            f"p99 ratio; p99.9 delta; updater CPU per slice (a swap's: {run.swap_cpu_ms:.2f} ms)",
            "",
            None,
        )
    ]
    for arm in run.arms:
        med = min(arm.rounds, key=lambda r: abs(r.ratio - arm.median_ratio))
        rows.append(
            Row(
                f"  [{arm.name}]",
                f"{arm.median_ratio:.2f} (rounds: "
                + ", ".join(f"{r.ratio:.2f}" for r in arm.rounds)
                + f"; {med.p99_swap:.3f} / {med.p99_steady:.3f} ms); "
                f"{arm.median_delta:+.3f} ms; {arm.cpu_ms:.2f} ms",
                "",
                None,
            )
        )
    return rows


def info_rows(run: SwapRun) -> list[Row]:
    """The same run with every core inferring: printed beside, not judged."""
    mib = 1024 * 1024
    tag = f"[all {run.threads} cores]"
    return [
        Row(
            f"{tag} p99 swap / steady, median round",
            f"{run.median_ratio:.2f} (rounds: "
            + ", ".join(f"{r.ratio:.2f}" for r in run.rounds)
            + ")",
            "",
            None,
        ),
        Row(
            f"{tag} p99.9 swap - steady, median round",
            f"{run.median_delta:+.3f} ms (rounds: "
            + ", ".join(f"{r.delta:+.3f}" for r in run.rounds)
            + " ms)",
            "",
            None,
        ),
        Row(
            f"{tag} failed inferences, swaps, RSS growth",
            f"{len(run.failures)}, {run.swaps}, {run.growth * 100:+.1f}% "
            f"({run.rss_after / mib:.1f} MiB)",
            "",
            None,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    cores = usable_cores()
    ap = argparse.ArgumentParser(prog="agent_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=MIN_SWAPS)
    ap.add_argument("--rounds", type=int, default=5, help="steady / swap rounds, interleaved")
    ap.add_argument(
        "--threads",
        type=int,
        default=max(1, cores - 1),
        help=f"inference threads (default: every core but one: {max(1, cores - 1)})",
    )
    ap.add_argument("--gap-ms", type=float, default=5.0, help="pause between swaps (ms)")
    ap.add_argument(
        "--no-all-cores", action="store_true", help="skip the informational all-cores run"
    )
    ap.add_argument("--no-footprint", action="store_true", help="skip the footprint starts")
    ap.add_argument(
        "--no-controls", action="store_true", help="skip the control arms (information only)"
    )
    args = ap.parse_args(argv)
    gap = args.gap_ms / 1000
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        work = Path(tmp)
        rows: list[Row] = []
        if not args.no_footprint:
            # Footprint first: this process has not mapped numpy or onnxruntime yet, so the
            # cold starts really find the agent's libraries out of the page cache.
            (work / "footprint").mkdir()
            rows = footprint_rows(work / "footprint")
        run = swap_bench(
            work,
            swaps=args.swaps,
            threads=args.threads,
            rounds=args.rounds,
            gap_s=gap,
            controls=not args.no_controls,
        )
        rows = judged_rows(run, cores) + control_rows(run) + rows
        if not args.no_all_cores and cores != args.threads:
            (work / "all").mkdir()
            every = swap_bench(
                work / "all", swaps=args.swaps, threads=cores, rounds=args.rounds, gap_s=gap
            )
            rows += info_rows(every)
    return 0 if print_rows(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
