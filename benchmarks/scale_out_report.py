"""The report of ``benchmarks.scale_out``: ``scale_out.md`` (tables) and ``scale_out.png``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def summary_rows(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The markdown table: one row per measured mode."""
    lines = [
        "| mode | devices | claimed s | trained s | registered s | by | t50 s | t99 s | t100 s "
        "| committed | downloads A/B | reports A/B | lost A/B | server CPU s A/B "
        "| server RSS MiB A/B | worker CPU s | worker RSS MiB (trainer) | load 1m start/end |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        tr, sv = r["training"], r["servers"]

        def both(key: str, sv: dict[str, Any] = sv) -> str:
            return "/".join(str(sv[k][key]) for k in ("A", "B") if k in sv)

        wk = tr["worker"]
        killed = r.get("killed_a_at_s")
        lines.append(
            f"| {r['mode']}{f' (A killed at t+{killed} s)' if killed is not None else ''} "
            f"| {r['devices']} | {tr['trigger_to_claimed_s']} | {tr['worker_training_s']} "
            f"| {tr['trained_to_registered_s']} | {tr['registered_by']} | {r['t50_s']} "
            f"| {r['t99_s']} | {'never' if r['t100_s'] is None else r['t100_s']} "
            f"| {r['committed']} | {both('artifact_downloads')} | {both('mqtt_received')} "
            f"| {both('reports_lost')} "
            f"| {both('cpu_s')} | {both('rss_peak_mib')} | {wk['cpu_s']} "
            f"| {wk['rss_peak_mib']} ({wk.get('children_rss_peak_mib')}) "
            f"| {r['load_avg_start'][0]}/{r['load_avg_end'][0]} |"
        )
    return lines


def write_report(result: dict[str, Any], out: Path) -> Path:
    """``scale_out.md`` (tables, the setup in words) and ``scale_out.png`` (committed over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    m, cfg = result["machine"], result["settings"]
    losses = [v for s in result["sets"] for r in s for v in r["servers"].values()]
    drops = sum(v.get("drops", 0) for v in losses)
    deadlocks = sum(v.get("deadlocks", 0) for v in losses)
    sets = result["sets"]
    dates = sorted({str(r.get("started_at", ""))[:10] for s in sets for r in s} - {""})
    lines = [
        "# Past one machine: one server against two, and failover",
        "",
        f"Machine: {m['cpus']} vCPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python "
        f"{m['python']}, {m['platform']}: a shared VM. Every process (PostgreSQL, Mosquitto, "
        "the servers, the worker and its trainer, the swarm of devices) ran on it; measured "
        f"{', '.join(dates)}. With 2 cores, two servers cannot show CPU scale-up: these figures "
        "show that the split works, what each process costs, and what a server's SIGKILL does.",
        "",
        "Command: `.venv/bin/python -m benchmarks.scale_out --devices "
        f"{result['devices']} --json benchmarks/results/scale_out.json`. Each mode: a fresh "
        "PostgreSQL database, production servers (no embedded worker) sharing an artifact "
        "directory, one release key and root, one `edgeloop worker`; the worker trains the "
        "first model, the fleet starts on it; then `POST /training-jobs` on server A, and the "
        "rollout of the result (one wave, no soak) created on A and approved on B (on A with one "
        "server). Two servers share one MQTT shared subscription group; half the devices "
        "enrolled through each (their HTTP base). Every pushed target names the approving "
        "server's artifact URL (`EDGELOOP_PUBLIC_URL`/api/v1/artifacts; "
        "`EDGELOOP_ARTIFACT_BASE_URL` unset), so B serves every download. `failover`: A is "
        "SIGKILLed at 25 % committed; if B's record of the rollout is not complete 30 s after "
        "the fleet settled, A is restarted. `failover-pinned`: approved on A, so every device "
        "downloads from A; A is SIGKILLed at 25 % and restarted at the same address 30 s "
        "later. Polls: worker "
        f"{cfg['job_poll_s']} s for queued jobs, registrar {cfg['registrar_poll_s']} s for trained "
        f"ones, rollout tick {cfg['rollout_tick_s']} s (production defaults).",
        "",
        "claimed: trigger -> the worker's claim; trained: the worker's training (claim -> "
        "hand-back); registered: hand-back -> registered and signed by a server's registrar "
        "(by: which one). t50/t99/t100: approval -> that share of the fleet committed (on the "
        "devices). downloads: the candidate's artifact GETs in each server's access log "
        "(200/206); reports: MQTT messages each server received over the rollout; lost: "
        'reports its ingest writer dropped ("database unavailable, N reports lost" in its '
        f"log; {deadlocks} of the {drops} drops were PostgreSQL deadlocks between the two "
        "servers' batches); server CPU "
        "and RSS over the rollout (approval -> settled); worker CPU (with its trainer child) "
        "and RSS over the training.",
    ]
    for i, runs in enumerate(sets, 1):
        lines += ["", f"## Run {i}", "", *summary_rows(runs)]
        for r in runs:
            extra = []
            if r.get("killed_a_at_s") is not None:
                extra.append(
                    f"A SIGKILLed at t+{r['killed_a_at_s']} s with {r['committed_at_kill']} "
                    "devices committed"
                )
            if r.get("a_restarted_at_s") is not None:
                extra.append(f"A restarted (same address) at t+{r['a_restarted_at_s']} s")
            if r.get("approved_on"):
                extra.append(f"approved on {r['approved_on']}")
            if r.get("devices_failed_once"):
                extra.append(f"{r['devices_failed_once']} devices reported a failed attempt")
            extra.append(
                f"server's view through {'B' if r['mode'] != 'one-server' else 'A'}: rollout "
                f"{r['rollout_state']}"
                + (f" at t+{r['rollout_state_seen_s']} s" if r["rollout_state_seen_s"] else "")
                + f", members {r['server_members']}"
            )
            again = r.get("after_restart_of_a")
            if again:
                extra.append(
                    f"A restarted at t+{again['restarted_at_s']} s (up in {again['up_after_s']} "
                    f"s): rollout {again['state']}"
                    + (f" at t+{again['seen_s']} s" if again["seen_s"] else "")
                    + f", members {again['members']}"
                )
            if r["not_committed"]:
                extra.append(f"not committed: {r['not_committed_reasons']}")
            lines.append(f"- {r['mode']}: " + "; ".join(extra))
    if len(sets) > 1:
        lines += ["", "Spread between runs (min - max):", ""]
        for mode in dict.fromkeys(r["mode"] for s in sets for r in s):
            rs = [r for s in sets for r in s if r["mode"] == mode]
            if len(rs) < 2:
                continue
            parts = []
            for key in ("t50_s", "t100_s"):
                vals = [r[key] for r in rs if r[key] is not None]
                if vals:
                    parts.append(f"{key[:-2]} {min(vals)} - {max(vals)} s")
            reg = [r["training"]["trained_to_registered_s"] for r in rs]
            parts.append(f"registered {min(reg)} - {max(reg)} s")
            lines.append(f"- {mode}: " + ", ".join(parts))
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r in sets[-1]:
        times = r["commit_times_s"]
        color = None
        if times:
            (line,) = ax.step(times, range(1, len(times) + 1), where="post", label=r["mode"])
            color = line.get_color()
        if r.get("killed_a_at_s") is not None:
            ax.axvline(
                r["killed_a_at_s"], color=color, linestyle=":", label=f"{r['mode']}: A killed"
            )
    ax.set(
        xlabel="seconds since approval",
        ylabel="devices committed",
        title=f"{result['devices']:,} devices: committed over time",
    )
    ax.legend()
    fig.tight_layout()
    png = out / "scale_out.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    lines += ["", f"![committed over time]({png.name})"]
    report = out / "scale_out.md"
    report.write_text("\n".join(lines) + "\n")
    return report
