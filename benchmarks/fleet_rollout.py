"""Approval -> whole fleet committed, push (MQTT) against polling, at 100 / 1,000 / 10,000 devices.

For each fleet size: the real server on a fresh PostgreSQL database, the real Mosquitto (password
file + ACL), and a swarm of simulated devices in this process (``firmware_sim.swarm``: each
device its own MQTT session and credential, its own Range download, signature and hash check,
status reports and metrics). The same fleet then takes one rollout per mode, each of a newly
trained candidate with a one-wave plan without soak:

- ``push``: devices hear their target on their retained MQTT topic;
- ``poll-60s`` / ``poll-300s``: devices GET ``/api/v1/devices/{id}/target`` every 60 / 300 s
  (random phase), the Mender / hawkBit model; status still goes over MQTT.

Figures per run: approval -> 50 / 99 / 100 % committed; announce -> swap per device (announce =
the server's ``notified_at`` for the device, swap = the new model serving) p50 / p99; server
resident memory and CPU seconds (psutil on the server process); MQTT messages (the server's
bridge counters and the devices' own) and bytes per device per update. A report (markdown table,
PNG charts) goes to ``--out``; ``--json`` writes every figure.

    .venv/bin/python -m benchmarks.fleet_rollout --devices 1000 --modes push,poll-60s
    .venv/bin/python -m benchmarks.fleet_rollout --json results.json --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from firmware_sim.services import raise_nofile
from firmware_sim.swarm import NOFILE, Group, Stack, Swarm, machine
from firmware_sim.swarm_device import DeviceConfig

SIZES = (100, 1_000, 10_000)
MODES = ("push", "poll-60s", "poll-300s")
TARGET_T100_10K_S = 60.0  # approval -> 100 % committed at 10,000 devices
TARGET_SWAP_P99_1K_S = 2.0  # announce -> swap p99 at 1,000 devices
TARGET_SPEEDUP = 100.0  # push p50 vs the 300 s polling p50


def poll_seconds(mode: str) -> float | None:
    return float(mode.removeprefix("poll-").removesuffix("s")) if mode.startswith("poll") else None


def pct(values: Sequence[float], p: float) -> float | None:
    return round(float(np.percentile(values, p)), 3) if len(values) else None


def at_fraction(times: Sequence[float], n: int, frac: float) -> float | None:
    """Seconds until ``frac`` of ``n`` devices had committed (None: never)."""
    k = int(np.ceil(frac * n))
    ordered = sorted(times)
    return round(ordered[k - 1], 3) if 0 < k <= len(ordered) else None


def health(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/healthz", timeout=60).json())


def parse_ts(value: Any) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


async def one_rollout(
    stack: Stack, swarm: Swarm, mode: str, *, timeout_s: float, quiet: bool
) -> dict[str, Any]:
    """Switch the fleet to ``mode``, roll out a fresh candidate, measure it."""
    loop = asyncio.get_running_loop()
    assert swarm.ctx is not None and stack.server is not None and stack.server.proc is not None
    poll_s = poll_seconds(mode)
    device_mode = "poll" if poll_s else "push"
    new_interval = poll_s is not None and poll_s != swarm.config.poll_s
    swarm.config.poll_s = poll_s or swarm.config.poll_s
    if new_interval or any(d.mode != device_mode for d in swarm.devices):
        # Reboot every device, also poll -> poll at a new interval: a device sleeping out its
        # old interval would otherwise poll within the old period of the switch, and the
        # fleet's phases would bunch instead of spreading uniformly over the new interval.
        if not quiet:
            print(f"  {len(swarm.devices)} devices: rebooting into {mode}", flush=True)
        await asyncio.gather(*(d.switch_mode(device_mode) for d in swarm.devices))
        await swarm.wait_online(swarm.devices, timeout=300)
    if not quiet:
        print(f"  {len(swarm.devices)} devices {mode}: training the candidate", flush=True)
    version = await loop.run_in_executor(None, stack.train)
    rid = await loop.run_in_executor(None, stack.rollout, version)
    server = psutil.Process(stack.server.proc.pid)
    health0 = await loop.run_in_executor(None, health, stack.url)
    counters0 = dict(vars(swarm.ctx.counters))
    http0 = {d.device_id: d.http_bytes for d in swarm.devices}
    mqtt0_bytes = {d.device_id: d.mqtt_bytes for d in swarm.devices}
    load0 = os.getloadavg()
    cpu0 = sum(server.cpu_times()[:2])
    rss_peak = server.memory_info().rss
    t0 = await loop.run_in_executor(None, stack.approve, rid)
    release = int(
        (await loop.run_in_executor(None, stack.api, "GET", f"/rollouts/{rid}"))["release"]
    )
    deadline = time.monotonic() + timeout_s
    n = len(swarm.devices)
    while time.monotonic() < deadline:
        rss_peak = max(rss_peak, server.memory_info().rss)
        tally = swarm.tally(release)
        if not quiet:
            print(
                f"\r  {n:>6} devices {mode:<9} t+{time.time() - t0:6.1f}s committed "
                f"{tally.get('committed', 0):>6} failed {tally.get('failed', 0):>5}",
                end="",
                flush=True,
            )
        if tally.get("committed", 0) + tally.get("failed", 0) >= n:
            break
        await asyncio.sleep(max(0.25, n / 10_000))  # the tally walks every device
    if not quiet:
        print()
    cpu_s = sum(server.cpu_times()[:2]) - cpu0
    load1 = os.getloadavg()
    await asyncio.sleep(2)  # the last reports reach the server
    health1 = await loop.run_in_executor(None, health, stack.url)
    members = await loop.run_in_executor(None, stack.api, "GET", f"/rollouts/{rid}/devices")
    rollout = await loop.run_in_executor(None, stack.api, "GET", f"/rollouts/{rid}")
    notified = {m["device_id"]: parse_ts(m.get("notified_at")) for m in members}
    commits: list[float] = []
    swaps: list[float] = []
    heard: list[float] = []  # announce -> the device has the verified target (NOTIFIED)
    for d in swarm.devices:
        c = d.times.get(f"commit:{release}")
        if c is not None:
            commits.append(c - t0)
        announced = notified.get(d.device_id) or t0
        s = d.times.get(f"swap:{release}")
        if s is not None:
            swaps.append(s - announced)
        h = d.times.get(f"notified:{release}")
        if h is not None:
            heard.append(h - announced)
    not_committed = [
        {
            "device_id": d.device_id,
            "state": d.flash.job.state.value if d.flash.job is not None else "idle",
            "reason": d.flash.job.reason if d.flash.job is not None else None,
        }
        for d in swarm.devices
        if f"commit:{release}" not in d.times
    ]
    counters1 = vars(swarm.ctx.counters)
    delta = {k: counters1[k] - counters0.get(k, 0) for k in counters1}
    http_bytes = [d.http_bytes - http0[d.device_id] for d in swarm.devices]
    mqtt_bytes = [d.mqtt_bytes - mqtt0_bytes[d.device_id] for d in swarm.devices]
    mqtt0, mqtt1 = health0.get("mqtt") or {}, health1.get("mqtt") or {}
    return {
        "devices": n,
        "mode": mode,
        "rollout_id": rid,
        "version": version,
        "rollout_state": rollout.get("state"),
        "committed": len(commits),
        "server_committed": sum(1 for m in members if m["state"] == "committed"),
        "not_committed": len(not_committed),
        "not_committed_sample": not_committed[:20],  # state and reason of each, first 20
        "t50_s": at_fraction(commits, n, 0.50),
        "t99_s": at_fraction(commits, n, 0.99),
        "t100_s": at_fraction(commits, n, 1.00),
        "swap_p50_s": pct(swaps, 50),
        "swap_p99_s": pct(swaps, 99),
        "heard_p50_s": pct(heard, 50),
        "heard_p99_s": pct(heard, 99),
        "server_cpu_s": round(cpu_s, 2),
        "server_rss_peak_mib": round(rss_peak / 2**20, 1),
        "broker_messages_server_published": mqtt1.get("published", 0) - mqtt0.get("published", 0),
        "broker_messages_server_received": mqtt1.get("received", 0) - mqtt0.get("received", 0),
        "device_messages_sent": delta["reports_sent"] + delta["metrics_sent"],
        "device_messages_received": delta["targets_received"],
        "http_requests": delta["http_requests"],
        # Bytes the device moved between approval and the fleet settling: download, polls,
        # status reports, and the steady metrics windows that fell inside that time.
        "bytes_per_device_per_update": round(float(np.mean(http_bytes) + np.mean(mqtt_bytes)), 1),
        "http_bytes_per_device": round(float(np.mean(http_bytes)), 1),
        "mqtt_bytes_per_device": round(float(np.mean(mqtt_bytes)), 1),
        "load_avg_before": [round(x, 2) for x in load0],
        "load_avg_after": [round(x, 2) for x in load1],
        "started_at": datetime.fromtimestamp(t0).astimezone().isoformat(timespec="seconds"),
        "commit_times_s": [round(c, 3) for c in sorted(commits)],
        "swap_latencies_s": [round(s, 3) for s in sorted(swaps)],
    }


async def run_size(
    n: int,
    modes: Sequence[str],
    *,
    pg: str,
    root: Path,
    quiet: bool,
    on_run: Callable[[dict[str, Any]], None] = lambda r: None,
    tls: bool = False,
) -> list[dict[str, Any]]:
    """Every mode's rollout on one fleet of ``n``; ``on_run`` gets each run as soon as it ends."""
    loop = asyncio.get_running_loop()
    stack = Stack(root / f"n{n}", pg_url=pg, devices=n, tls=tls)
    await loop.run_in_executor(None, stack.start)
    swarm: Swarm | None = None
    runs: list[dict[str, Any]] = []
    try:
        await loop.run_in_executor(None, stack.wait_champion)
        assert stack.server is not None
        config = DeviceConfig(
            server_url=stack.url,
            mqtt_host="127.0.0.1",
            mqtt_port=stack.broker.port,
            metrics_interval_s=30.0,
            mqtt_tls_context=stack.device_tls_context(),
        )
        swarm = Swarm(
            config,
            trusted_root=stack.server.root_path.read_bytes(),
            groups=[Group("healthy", 1.0)],
            devices=n,
            id_prefix="bench",
        )
        await swarm.open()
        token = await loop.run_in_executor(None, lambda: stack.server.enrollment_token(max_uses=n))  # type: ignore[union-attr]
        t = time.time()
        devices = await swarm.enroll(token, swarm.plan_groups())
        enroll_s = time.time() - t
        swarm.provision(devices, await swarm.factory_image(devices[0]))
        t = time.time()
        swarm.boot(devices)
        await swarm.wait_online(devices, timeout=600)
        connect_s = time.time() - t
        if not quiet:
            print(f"  {n} devices: enrolled in {enroll_s:.1f} s, connected in {connect_s:.1f} s")
        swarm.start_traffic()
        await asyncio.sleep(config.metrics_interval_s + 2)  # the champion's metrics exist
        for mode in modes:
            poll = poll_seconds(mode) or 0.0
            r = await one_rollout(
                stack, swarm, mode, timeout_s=max(300.0, 3 * poll + 120), quiet=quiet
            )
            r.update(
                {"enroll_s": round(enroll_s, 1), "connect_s": round(connect_s, 1), "mqtt_tls": tls}
            )
            runs.append(r)
            on_run(r)
    finally:
        if swarm is not None:
            await swarm.close()
        await loop.run_in_executor(None, stack.stop)
    return runs


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n in sorted({r["devices"] for r in runs}):
        by = {r["mode"]: r for r in runs if r["devices"] == n}
        push = by.get("push")
        for mode in ("poll-60s", "poll-300s"):
            poll = by.get(mode)
            if push and poll and push["swap_p50_s"] and poll["swap_p50_s"]:
                out.append(
                    {
                        "devices": n,
                        "versus": mode,
                        "swap_p50_ratio": round(poll["swap_p50_s"] / push["swap_p50_s"], 1),
                        "t100_ratio": round(poll["t100_s"] / push["t100_s"], 1)
                        if poll["t100_s"] and push["t100_s"]
                        else None,
                    }
                )
    return out


def write_report(result: dict[str, Any], out: Path) -> Path:
    """Markdown table + PNG charts (committed over time; swap latency distribution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    out.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    m = result["machine"]
    dates = sorted({str(r.get("started_at", ""))[:10] for r in runs} - {""})
    loads = [x for r in runs for x in (r.get("load_avg_before", [None])[0],) if x is not None]
    lines = [
        "# Fleet rollout: approval -> committed, push vs polling",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}, {m['platform']}; the server on PostgreSQL, the real Mosquitto, "
        f"and the swarm all on this machine. Measured {', '.join(dates)}. The machine was shared "
        "with other work while it ran (1-minute load average at approval: "
        + (f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded")
        + ", on 2 cores).",
        "",
        "t50/t99/t100: approval -> that share of the fleet committed (plan: one wave, no soak; "
        "every device serves 1 s of labelled probation traffic before it commits). "
        "swap: the server's announce (`notified_at`) -> the new model serving on the device; "
        "heard: announce -> the device holds the verified target. Bytes per device: everything "
        "the device moved between approval and the fleet settling (download, polls, status, "
        "and the steady metrics windows that fell in that time).",
        "",
        "| devices | mode | committed | t50 s | t99 s | t100 s | swap p50 s | swap p99 s "
        "| heard p50 s "
        "| server CPU s | server RSS MiB | server msgs out/in | device msgs out/in "
        "| bytes/device (HTTP) | load 1m |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        load = r.get("load_avg_before")
        lines.append(
            f"| {r['devices']} | {r['mode']} | {r['committed']} | {r['t50_s']} | {r['t99_s']} "
            f"| {'never' if r['t100_s'] is None else r['t100_s']} "
            f"| {r['swap_p50_s']} | {r['swap_p99_s']} | {r.get('heard_p50_s')} "
            f"| {r['server_cpu_s']} | {r['server_rss_peak_mib']} "
            f"| {r['broker_messages_server_published']}/{r['broker_messages_server_received']} "
            f"| {r['device_messages_sent']}/{r['device_messages_received']} "
            f"| {r['bytes_per_device_per_update']:.0f} ({r.get('http_bytes_per_device', 0):.0f}) "
            f"| {load[0] if load else ''} |"
        )
    setup = [
        f"| {r['devices']} | {r.get('enroll_s')} | {r.get('connect_s')} |"
        for r in runs
        if r["mode"] == runs[[x["devices"] for x in runs].index(r["devices"])]["mode"]
    ]
    lines += ["", "| devices | enroll s | connect s |", "|---:|---:|---:|", *setup]
    if result.get("ratios"):
        lines += ["", "| devices | push vs | swap p50 ratio | t100 ratio |", "|---:|---|---:|---:|"]
        for q in result["ratios"]:
            lines.append(
                f"| {q['devices']} | {q['versus']} | {q['swap_p50_ratio']}x "
                f"| {'-' if q['t100_ratio'] is None else str(q['t100_ratio']) + 'x'} |"
            )
    for n in sorted({r["devices"] for r in runs}):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for r in (r for r in runs if r["devices"] == n):
            times = r["commit_times_s"]
            if times:
                ax1.step(times, np.arange(1, len(times) + 1), where="post", label=r["mode"])
            lat = [x for x in r["swap_latencies_s"] if x > 0]
            if lat:
                bins = np.logspace(np.log10(min(lat)), np.log10(max(lat) * 1.01), 40)
                ax2.hist(lat, bins=bins, histtype="step", label=r["mode"])
        ax1.set(
            xlabel="seconds since approval (log)",
            ylabel="devices committed",
            title=f"{n:,} devices: committed over time",
            xscale="log",
        )
        ax1.legend()
        ax2.set(
            xlabel="announce -> swap, seconds (log)",
            ylabel="devices",
            title="swap latency",
            xscale="log",
        )
        ax2.legend()
        for ax in (ax1, ax2):  # plain numbers on the log axes, no 2x10^0 minor labels
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        fig.tight_layout()
        png = out / f"fleet_rollout_{n}.png"
        fig.savefig(png, dpi=80)
        plt.close(fig)
        lines += ["", f"![{n} devices]({png.name})"]
    report = out / "fleet_rollout.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_rollout", description=__doc__.split("\n")[0]
    )
    p.add_argument("--devices", help="fleet size(s), comma-separated (default: 100,1000,10000)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of push,poll-60s,poll-300s")
    p.add_argument("--pg", default=None, help="PostgreSQL URL (default: var/test-pg-url)")
    p.add_argument("--json", type=Path, help="write every figure here (after each mode)")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the runs already in --json (a size+mode measured again replaces its run)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="report folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tls", action="store_true", help="MQTT over TLS (a throwaway CA)")
    p.add_argument(
        "--report-only", action="store_true", help="redraw the report from --json, run nothing"
    )
    a = p.parse_args(argv)
    if a.report_only:
        if not a.json:
            p.error("--report-only needs --json")
        print(f"report: {write_report(json.loads(a.json.read_text()), a.out)}")
        return 0
    pg = a.pg or Path("var/test-pg-url").read_text().strip()
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m != "push" and poll_seconds(m) is None]
    if bad:
        p.error(f"unknown mode(s) {bad}: use push or poll-<seconds>s")
    raise_nofile(NOFILE)
    sizes = [int(x) for x in a.devices.split(",")] if a.devices else list(SIZES)
    root = Path(tempfile.mkdtemp(prefix="edgeloop-fleet-bench-"))
    runs: list[dict[str, Any]] = []
    if a.append and a.json and a.json.exists():
        runs = list(json.loads(a.json.read_text()).get("runs", []))
    result: dict[str, Any] = {"machine": machine(), "runs": runs, "ratios": ratios(runs)}

    def keep(run: dict[str, Any]) -> None:
        """Merge one finished run and write the JSON at once: a later mode or size that fails
        or is stopped keeps every figure measured before it."""
        nonlocal runs, result
        key = (run["devices"], run["mode"])
        runs = [r for r in runs if (r["devices"], r["mode"]) != key] + [run]
        runs.sort(key=lambda r: (r["devices"], MODES.index(r["mode"]) if r["mode"] in MODES else 9))
        result = {"machine": machine(), "runs": runs, "ratios": ratios(runs)}
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))

    for n in sizes:
        asyncio.run(run_size(n, modes, pg=pg, root=root, quiet=a.quiet, on_run=keep, tls=a.tls))
    report = write_report(result, a.out)
    for r in runs:
        print(
            f"{r['devices']:>6} {r['mode']:<9} t50 {r['t50_s']} t99 {r['t99_s']} "
            f"t100 {r['t100_s']} s; swap p50 {r['swap_p50_s']} p99 {r['swap_p99_s']} s; "
            f"server CPU {r['server_cpu_s']} s, RSS {r['server_rss_peak_mib']} MiB; "
            f"{r['bytes_per_device_per_update']:.0f} B/device"
        )
    for q in result["ratios"]:
        print(f"{q['devices']:>6} push vs {q['versus']}: swap p50 {q['swap_p50_ratio']}x faster")
    print(f"report: {report}")
    print(f"work directory (server and broker logs, kept): {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
