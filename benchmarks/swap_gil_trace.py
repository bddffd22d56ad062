"""Where an inference waits during a hot swap: its futex waits (the GIL, malloc locks), per part.

    .venv/bin/python -m benchmarks.swap_gil_trace [--swaps 300] [--gap-ms 5]

Diagnostic, not a benchmark: Linux only, needs ``perf`` with the syscall tracepoints (root, or
``kernel.perf_event_paranoid`` <= -1). It re-runs itself under ``perf record`` as a child in which
one thread calls ``ModelRuntime.predict`` without pause while the main thread performs swaps in
their parts, as ``ModelRuntime.load`` / ``swap`` / ``release_retired`` do them: build the session,
check and warm it up, flip the reference, free the old one (waiting for the in-flight call, then
``malloc_trim``), then the gap; an idle slice follows each swap as a control. A marker system
call (``getppid``) delimits each part; each futex wait of the inference thread is counted in the
part in which it ends.

A thread blocks in a futex wait when it wants the GIL while another thread holds it (or a lock
such as a malloc arena's); while one thread serves alone it takes the GIL without waiting. The
waits per swap and their length are what a swap costs the inferences beside it, independent of
how busy the machine is otherwise (a preempted thread does not wait in a futex).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PARTS = ("build", "warm-up + checks", "flip", "free (wait, destroy, trim)", "gap")
SLOW_US = 20.0  # a wait longer than this is counted apart (steady p99 is 40-60 us here)


def child(workdir: Path, swaps: int, gap_s: float) -> None:
    """The traced workload: print the inference thread's id, then swap in marked parts."""
    import numpy as np

    from benchmarks.agent_bench import FEATURES, digits_mlp, manifest_for
    from device_agent.config import AgentConfig
    from device_agent.runtime import ModelRuntime, freeze_heap, tune_interpreter

    defaults = AgentConfig(device_id="trace", model_line="digits")
    tune_interpreter(defaults.switch_interval_s)
    paths, manifests = [], []
    for i in range(2):
        data = digits_mlp(i)
        paths.append(workdir / f"m{i}.onnx")
        paths[-1].write_bytes(data)
        manifests.append(manifest_for(data, i + 1))
    rt = ModelRuntime(
        intra_op_num_threads=defaults.intra_op_num_threads,
        graph_optimization=defaults.graph_optimization,
    )
    rt.swap(rt.load(paths[0], manifests[0]))
    freeze_heap()
    x = np.random.default_rng(0).uniform(0, 16, FEATURES).astype(np.float32)
    stop = threading.Event()

    def infer() -> None:
        print("INFER_TID", threading.get_native_id(), flush=True)
        while not stop.is_set():
            rt.predict(x)

    worker = threading.Thread(target=infer, daemon=True)
    worker.start()
    time.sleep(0.3)
    for i in range(20):  # warm-up swaps, unmarked
        rt.swap(rt.load(paths[i % 2], manifests[i % 2]), retire=True)
        rt.release_retired(5.0)
    mark = os.getppid  # a system call that nothing else here makes: the part boundaries
    for i in range(swaps):
        which = i % 2
        mark()
        session = rt.build(paths[which])
        mark()
        loaded = rt.prepare(session, manifests[which])
        del session
        mark()
        rt.swap(loaded, retire=True)
        del loaded
        mark()
        rt.release_retired(5.0)
        mark()
        time.sleep(gap_s)
        mark()  # idle control slice, as long as the gap
        time.sleep(gap_s)
    mark()
    stop.set()
    worker.join()


def analyse(perf_data: Path, child_out: str, swaps: int) -> list[str]:
    """The inference thread's futex waits per part, from ``perf script``."""
    import numpy as np

    tid = int(re.search(r"INFER_TID (\d+)", child_out).group(1))  # type: ignore[union-attr]
    script = subprocess.run(
        ["perf", "script", "-i", str(perf_data), "-F", "tid,time,event,trace"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    marks: list[float] = []
    waits: list[tuple[float, float]] = []
    entered: float | None = None
    for line in script.splitlines():
        fields = line.split(None, 3)
        if len(fields) < 3:
            continue
        thread, stamp, event = int(fields[0]), float(fields[1].rstrip(":")), fields[2]
        if "getppid" in event:
            marks.append(stamp)
        elif thread != tid:
            continue
        elif "sys_enter_futex" in event:
            op = re.search(r"op: (0x[0-9a-f]+)", line)
            if op and int(op.group(1), 16) & 0x7F in (0, 9):  # FUTEX_WAIT, FUTEX_WAIT_BITSET
                entered = stamp
        elif "sys_exit_futex" in event and entered is not None:
            waits.append((entered, stamp))
            entered = None
    slices = len(PARTS) + 1  # the parts, then the idle control slice
    edges = np.asarray(marks)
    if edges.size != swaps * slices + 1:
        raise SystemExit(f"expected {swaps * slices + 1} markers, perf saw {edges.size}")
    span = np.diff(edges).reshape(swaps, slices) * 1e6
    # A wait belongs to the part in which it ends: the holder let go of the GIL there, so that
    # part held it (a wait that starts as the updater wakes from the gap ends in the build).
    end = np.asarray([w[1] for w in waits])
    length = np.asarray([w[1] - w[0] for w in waits]) * 1e6
    which = (np.searchsorted(edges, end, side="right") - 1) % slices
    inside = (end >= edges[0]) & (end < edges[-1])
    rows = [
        f"{'part':28s} {'us (p50)':>9s} {'waits/swap':>10s} {f'>{SLOW_US:g}us/swap':>12s} "
        f"{'blocked us/swap':>15s} {'wait p50 us':>11s}"
    ]
    for k, name in enumerate((*PARTS, "idle (control)")):
        hit = inside & (which == k)
        lens = length[hit]
        rows.append(
            f"{name:28s} {np.median(span[:, k]):9.0f} {hit.sum() / swaps:10.2f} "
            f"{(lens > SLOW_US).sum() / swaps:12.2f} {lens.sum() / swaps:15.1f} "
            f"{(np.median(lens) if lens.size else 0.0):11.1f}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="swap_gil_trace", description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=5.0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(Path(args.child), args.swaps, args.gap_ms / 1000)
        return 0
    with tempfile.TemporaryDirectory(prefix="swap-gil-trace-") as tmp:
        data = Path(tmp) / "perf.data"
        events = ["syscalls:sys_enter_futex", "syscalls:sys_exit_futex"]
        events.append("syscalls:sys_enter_getppid")
        cmd = ["perf", "record", "-q", "-o", str(data)]
        for event in events:
            cmd += ["-e", event]
        cmd += [sys.executable, "-m", "benchmarks.swap_gil_trace", "--child", tmp]
        cmd += ["--swaps", str(args.swaps), "--gap-ms", str(args.gap_ms)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stdout + run.stderr, file=sys.stderr)
            return 1
        print(
            f"{args.swaps} swaps, {args.gap_ms:g} ms apart; load average {os.getloadavg()[0]:.1f}"
        )
        print("\n".join(analyse(data, run.stdout, args.swaps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
