"""Label-free drift monitoring benchmark: a simulated fleet, one group drifted, alerts judged.

    .venv/bin/python -m benchmarks.monitoring [--periods 150] [--json PATH]

Everything real but the network: the training pipeline trains the digits line's first model and
embeds its monitoring reference (``training.monitoring``); each simulated device loads that ONNX
file with the agent's runtime (``device_agent.runtime``: reference read from the signed bytes),
classifies its inputs one by one through ONNX Runtime and feeds the agent's ``Monitor``; every
period each device's summary is encoded with the contract (``contract.monitoring``) and handed
over as the bytes it would publish. The judge parses those bytes as the server will, adds the
summaries of a device group into one window per period, scores it (``server.monitoring.drift``),
estimates accuracy without labels (``server.monitoring.estimate``) and runs the alert rules with
hysteresis (``server.monitoring.rules``).

Groups: three untouched; "east" gets the simulator's camera drift (``training.data.drift``,
severity 1.0, what ``firmware_sim.swarm`` applies) and "harbour" half of it, both from period
``--drift-from`` on. Clean traffic is drawn from the 497-image field pool; a window of ``n``
resampled from a pool that small carries the pool's own sampling error too (``n / 497`` more
variance than ``n`` independent images), and every window of the run shares that error. The judge
says so to the drift statistics (``NullCalibrator(dispersion=1 + n / 497)``); ``--dispersion 1``
shows what ignoring it costs (a per-window false-alarm rate about twice alpha, and now and then
two in a row: a false alert).

The label-free accuracy estimate is judged in every phase, drift 1.0 included, and fails there:
the model is confidently wrong on those inputs (``benchmarks/estimators.py`` measures the
estimators tried). What must hold instead: every window of a phase whose estimate is off is
marked untrusted (its drift verdict breaches), and the trusted windows' estimate is within 5
points in every phase.

The fleet (:class:`FleetSim`) and the judge (:class:`OfflineJudge`) only meet through
``(topic, payload)`` pairs and :meth:`OfflineJudge.close`; a judge that publishes the payloads to
the real server over MQTT and reads its alerts back can replace this one unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from benchmarks.agent_footprint import Row, print_rows

T0 = 1_760_000_000.0  # unix seconds at the start of period 0 (device clocks are simulated)
MQTT_PUBLISH_OVERHEAD = 1 + 2 + 2 + 2 + 1  # bytes: header, length (<16 KiB), topic len, id, props


@dataclass(frozen=True)
class Group:
    name: str
    devices: int
    severity: float = 0.0  # drift severity from ``drift_from`` on (0: untouched)


@dataclass(frozen=True)
class Scenario:
    groups: tuple[Group, ...] = (
        Group("north", 4),
        Group("south", 4),
        Group("west", 4),
        Group("east", 4, severity=1.0),
        Group("harbour", 4, severity=0.5),
    )
    periods: int = 150
    drift_from: int = 50  # first drifted period
    period_s: float = 60.0  # seconds per reporting period
    rate_hz: float = 0.5  # inferences per device per second
    alpha: float = 0.01  # stated per-window false-alarm rate of a drift verdict
    dispersion: float | None = None  # None: 1 + window samples / pool size (see module doc)
    seed: int = 0

    @property
    def per_period(self) -> int:
        return round(self.rate_hz * self.period_s)


class Judge(Protocol):
    """Where the fleet's bytes go: this offline judge, or (later) the real server."""

    def ingest(self, topic: str, payload: bytes) -> None: ...

    def close(self, period: int) -> list[WindowOutcome]: ...


@dataclass(frozen=True)
class WindowOutcome:
    group: str
    period: int
    samples: int
    breach: bool  # calibrated drift verdict
    fixed_psi_breach: bool  # "any signal's PSI > 0.1" on the same window
    estimate: float | None  # label-free accuracy
    trusted: bool | None  # the estimate may be read as accuracy (no drift breach)
    drifted: tuple[str, ...]
    raised: bool  # the drift alert was raised at this window
    fixed_raised: bool  # the same hysteresis on the fixed rule raised here


# ---- the fleet -----------------------------------------------------------------------------
def _manifest(data: bytes):  # noqa: ANN202 - contract type, imported lazily
    from contract.manifest import ArtifactRef, InputSpec, Manifest

    now = datetime.now(UTC)
    return Manifest(
        model_line="digits",
        release=1,
        model_version=1,
        artifact=ArtifactRef("model.onnx", hashlib.sha256(data).hexdigest(), len(data)),
        input_spec=InputSpec(name="input", shape=(-1, 64), dtype="float32", min=0.0, max=1.0),
        labels=tuple(str(i) for i in range(10)),
        created_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(days=1),
    )


@dataclass
class _Device:
    device_id: str
    group: Group
    monitor: Any
    rng: np.random.Generator


@dataclass
class FleetSim:
    """Devices serving one model through the agent's runtime and monitor (see module doc)."""

    scenario: Scenario
    model_path: Path
    pools: Mapping[float, tuple[np.ndarray, np.ndarray]]  # severity -> (X, y)
    now: float = T0
    truth: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # -> [right, n]
    uplink: list[int] = field(default_factory=list)  # bytes of each summary's MQTT packet
    observe_s: float = 0.0  # seconds in Monitor.observe (the inference thread's share)
    close_s: float = 0.0  # seconds in Monitor.snapshot_and_reset (the metrics thread's)
    inferences: int = 0

    def __post_init__(self) -> None:
        from device_agent.monitor import Monitor
        from device_agent.runtime import ModelRuntime

        data = self.model_path.read_bytes()
        self.loaded = ModelRuntime(min_free_memory_bytes=0).load(self.model_path, _manifest(data))
        if self.loaded.monitoring is None:
            raise SystemExit("the trained model carries no monitoring reference")
        self.devices: list[_Device] = []
        for g in self.scenario.groups:
            for i in range(g.devices):
                device_id = f"{g.name}-{i:02d}"
                monitor = Monitor(device_id=device_id, model_line="digits", clock=lambda: self.now)
                seed = [self.scenario.seed, len(self.devices)]
                self.devices.append(_Device(device_id, g, monitor, np.random.default_rng(seed)))

    @property
    def group_of(self) -> dict[str, str]:
        return {d.device_id: d.group.name for d in self.devices}

    def period(self, k: int) -> list[tuple[str, bytes]]:
        """Run period ``k`` on every device; the (topic, payload) each one publishes."""
        from contract.topics import Topics
        from device_agent.runtime import classify

        topics, sc, out = Topics(), self.scenario, []
        self.now = T0 + k * sc.period_s
        for dev in self.devices:
            severity = dev.group.severity if k >= sc.drift_from else 0.0
            X, y = self.pools[severity]
            right = 0
            for i in dev.rng.integers(0, len(X), sc.per_period):
                raw = classify(self.loaded, X[i])
                t = time.perf_counter()
                dev.monitor.observe(self.loaded, X[i], raw.probabilities)
                self.observe_s += time.perf_counter() - t
                right += raw.label == y[i]
            self.inferences += sc.per_period
            tally = self.truth.setdefault((dev.group.name, k), [0, 0])
            tally[0] += int(right)
            tally[1] += sc.per_period
        self.now = T0 + (k + 1) * sc.period_s
        for dev in self.devices:
            t = time.perf_counter()
            summaries = dev.monitor.snapshot_and_reset(serving_sha256=self.loaded.sha256, release=1)
            self.close_s += time.perf_counter() - t
            topic = topics.monitor(dev.device_id)
            for s in summaries:
                payload = s.to_json()
                self.uplink.append(len(payload) + len(topic) + MQTT_PUBLISH_OVERHEAD)
                out.append((topic, payload))
        return out


# ---- the judge -----------------------------------------------------------------------------
class OfflineJudge:
    """What the server will do with the summaries, in memory: parse, window, score, alert."""

    def __init__(
        self,
        onnx: bytes,
        group_of: Mapping[str, str],
        scenario: Scenario,
        *,
        dispersion: float = 1.0,
    ) -> None:
        from contract.monitoring import METADATA_KEY, MonitoringReference
        from server.monitoring.drift import NullCalibrator
        from server.monitoring.rules import DEFAULT_POLICIES, AlertState, Rule
        from training.export import read_metadata

        self.reference = MonitoringReference.from_json(read_metadata(onnx)[METADATA_KEY])
        self.calibrator = NullCalibrator(
            {s.name: s.counts for s in self.reference.signals},
            alpha=scenario.alpha,
            dispersion=dispersion,
        )
        self.policy = DEFAULT_POLICIES[Rule.DRIFT]
        self.group_of = dict(group_of)
        self.period_s = scenario.period_s
        self.pending: dict[tuple[int, str], list[dict[str, tuple[int, ...]]]] = defaultdict(list)
        self.states: dict[str, Any] = defaultdict(AlertState)
        self.fixed_states: dict[str, Any] = defaultdict(AlertState)
        self.refused = 0

    def ingest(self, topic: str, payload: bytes) -> None:
        from contract import MessageError
        from contract.monitoring import MonitorSummary

        try:
            s = MonitorSummary.from_dict(payload)
            s.check_against(self.reference)
        except MessageError:
            self.refused += 1
            return
        period = round((s.start - T0) / self.period_s)
        self.pending[(period, self.group_of[s.device_id])].append(s.histograms)

    def close(self, period: int) -> list[WindowOutcome]:
        from contract.monitoring import merge_counts
        from server.monitoring.drift import score_window
        from server.monitoring.estimate import estimate_accuracy, estimate_trusted
        from server.monitoring.rules import Observation, Transition, step

        out = []
        for key in sorted(k for k in self.pending if k[0] == period):
            group = key[1]
            window = merge_counts(self.pending.pop(key))
            verdict = score_window(self.calibrator, window, min_samples=self.policy.min_samples)
            cal = self.reference.calibration
            est = estimate_accuracy(window["confidence"], cal) if cal is not None else None
            self.states[group], change = step(
                self.states[group], Observation(verdict.breach, verdict.samples), self.policy
            )
            self.fixed_states[group], fixed = step(
                self.fixed_states[group],
                Observation(verdict.fixed_psi_breach, verdict.samples),
                self.policy,
            )
            out.append(
                WindowOutcome(
                    group=group,
                    period=period,
                    samples=verdict.samples,
                    breach=verdict.breach,
                    fixed_psi_breach=verdict.fixed_psi_breach,
                    estimate=est.accuracy if est is not None else None,
                    trusted=estimate_trusted(
                        est.accuracy if est is not None else None, verdict.to_dict()
                    ),
                    drifted=verdict.drifted,
                    raised=change is Transition.RAISED,
                    fixed_raised=fixed is Transition.RAISED,
                )
            )
        return out


# ---- the run -------------------------------------------------------------------------------
def train_model(workdir: Path) -> Path:
    """The digits line's first model, exported by the training pipeline with its reference."""
    from training.data import LABELS
    from training.pipeline import MODEL_FILE, run_job
    from training.spec import JobSpec

    spec = {
        "job_id": 1,
        "model_line": "digits",
        "trainer": "sklearn-mlp",
        "hyperparams": {},
        "seed": 0,
        "samples_path": None,
        "champion": None,
        "gate": {"max_golden_drop": 0.03, "min_field_gain": 0.0},
        "input_spec": {"name": "input", "shape": [-1, 64], "dtype": "float32", "min": 0, "max": 1},
        "labels": list(LABELS),
        "output_dir": str(workdir),
    }
    run_job(JobSpec.from_dict(spec))
    return workdir / MODEL_FILE


def drift_pools(severities: set[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    from training.data import digits_pools, drift

    field_pool = digits_pools().field
    return {
        s: (drift(field_pool.X, severity=s, seed=1) if s else field_pool.X, field_pool.y)
        for s in severities | {0.0}
    }


def overhead_us(sim: FleetSim, n: int = 20_000) -> dict[str, float]:
    """Per-inference cost (µs) on one device's serving path: ``classify`` alone, and what the
    monitor adds to it (``observe`` plus its share of binning), timed in alternating blocks so
    that load from other processes hits both alike; medians over the blocks."""
    from device_agent.monitor import Monitor
    from device_agent.runtime import classify

    X = sim.pools[0.0][0]
    idx = np.random.default_rng(9).integers(0, len(X), n)
    monitor = Monitor(device_id="bench", model_line="digits", clock=time.time)
    plain, added, block = [], [], 1000
    for start in range(0, n, block):
        rows = idx[start : start + block]
        t = time.perf_counter()
        probs = [classify(sim.loaded, X[i]).probabilities.copy() for i in rows]
        plain.append((time.perf_counter() - t) / len(rows))
        t = time.perf_counter()
        for i, p in zip(rows, probs, strict=True):
            monitor.observe(sim.loaded, X[i], p)
        monitor.flush()
        added.append((time.perf_counter() - t) / len(rows))
    return {
        "classify_us": float(np.median(plain) * 1e6),
        "added_us": float(np.median(added) * 1e6),
    }


def run(scenario: Scenario, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    model = train_model(workdir / "train")
    pools = drift_pools({g.severity for g in scenario.groups})
    prepared_s = time.perf_counter() - started
    sim = FleetSim(scenario, model, pools)
    dispersion = scenario.dispersion
    if dispersion is None:  # the pool's own sampling error, shared by every window
        window = np.median([g.devices for g in scenario.groups]) * scenario.per_period
        dispersion = float(1.0 + window / len(pools[0.0][1]))
    judge: Judge = OfflineJudge(model.read_bytes(), sim.group_of, scenario, dispersion=dispersion)
    windows: list[WindowOutcome] = []
    for k in range(scenario.periods):
        for topic, payload in sim.period(k):
            judge.ingest(topic, payload)
        windows += judge.close(k)
    result = summarise(scenario, sim, windows, overhead_us(sim), prepared_s, started)
    result["dispersion"] = dispersion
    return result


def summarise(
    sc: Scenario,
    sim: FleetSim,
    windows: list[WindowOutcome],
    overhead: dict[str, float],
    prepared_s: float,
    started: float,
) -> dict[str, Any]:
    severity = {g.name: g.severity for g in sc.groups}
    clean = [w for w in windows if severity[w.group] == 0 or w.period < sc.drift_from]
    detection: dict[str, int | None] = {}
    for g in sc.groups:
        if g.severity:
            raised = [w.period for w in windows if w.group == g.name and w.raised]
            after = [p for p in raised if p >= sc.drift_from]
            detection[g.name] = after[0] - sc.drift_from + 1 if after else None
    errors: dict[str, list[float]] = defaultdict(list)  # phase -> per-window |est - true|
    # phase -> [estimated * n, right, n]: every window, and the windows whose estimate is trusted
    phase_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    trusted_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    untrusted: dict[str, int] = defaultdict(int)
    for w in windows:
        if w.estimate is None:
            continue
        s = severity[w.group] if w.period >= sc.drift_from else 0.0
        phase = "clean" if s == 0 else f"drift_{s:g}"
        right, n = sim.truth[(w.group, w.period)]
        errors[phase].append(abs(w.estimate - right / n))
        for totals in (phase_totals, trusted_totals) if w.trusted else (phase_totals,):
            tot = totals[phase]
            tot[0] += w.estimate * n
            tot[1] += right
            tot[2] += n
        untrusted[phase] += w.trusted is False
    phases: dict[str, dict[str, Any]] = {
        p: {
            "estimated": t[0] / t[2],
            "true": t[1] / t[2],
            "error": abs(t[0] - t[1]) / t[2],
            "window_error_p95": float(np.percentile(errors[p], 95)),
            "windows": len(errors[p]),
            "untrusted_windows": untrusted[p],
            "trusted_error": (
                abs(trusted_totals[p][0] - trusted_totals[p][1]) / trusted_totals[p][2]
                if trusted_totals[p][2]
                else None
            ),
        }
        for p, t in sorted(phase_totals.items())
    }
    trusted_errors = [v["trusted_error"] for v in phases.values() if v["trusted_error"] is not None]
    uplink = np.asarray(sim.uplink)
    per_device_period = float(uplink.mean())
    return {
        "detection_periods": detection,
        "windows": len(windows),
        "no_drift_windows": len(clean),
        "false_alarm_windows": sum(w.breach for w in clean),
        "false_alarm_rate": sum(w.breach for w in clean) / len(clean),
        "false_alerts": sum(w.raised for w in clean),
        "psi01_false_alarm_windows": sum(w.fixed_psi_breach for w in clean),
        "psi01_false_alerts": sum(w.fixed_raised for w in clean),
        "stated_alpha": sc.alpha,
        "window_samples": int(np.median([w.samples for w in windows])),
        "estimated_accuracy": phases,
        "estimated_accuracy_max_error": max(v["error"] for v in phases.values()),
        "trusted_estimate_max_error": max(trusted_errors) if trusted_errors else None,
        "uplink_bytes_per_device_period": per_device_period,
        "uplink_bytes_per_device_period_max": int(uplink.max()),
        "uplink_bytes_per_device_hour": per_device_period * 3600.0 / sc.period_s,
        "monitor_overhead": overhead,
        "monitor_observe_us_per_inference": sim.observe_s / max(sim.inferences, 1) * 1e6,
        "monitor_close_us_per_device_period": sim.close_s / max(len(sim.uplink), 1) * 1e6,
        "inferences": sim.inferences,
        "prepare_s": round(prepared_s, 1),
        "run_s": round(time.perf_counter() - started, 1),
        "scenario": {
            "groups": [[g.name, g.devices, g.severity] for g in sc.groups],
            "periods": sc.periods,
            "drift_from": sc.drift_from,
            "period_s": sc.period_s,
            "rate_hz": sc.rate_hz,
        },
    }


def rows_of(r: dict[str, Any]) -> list[Row]:
    det = r["detection_periods"]
    acc = r["estimated_accuracy"]
    rows = [
        Row(f"detection periods ({g})", str(p), "<= 3", p is not None and p <= 3)
        for g, p in det.items()
    ]
    rows += [
        Row(
            "windows / without drift",
            f"{r['windows']} / {r['no_drift_windows']}",
            ">= 500",
            r["no_drift_windows"] >= 500,
        ),
        Row("false alerts (no drift)", str(r["false_alerts"]), "0", r["false_alerts"] == 0),
        Row(
            "false-alarm windows",
            f"{r['false_alarm_windows']} ({r['false_alarm_rate']:.2%})",
            f"alpha {r['stated_alpha']:g}",
            None,
        ),
        Row(
            '"PSI > 0.1" false-alarm windows', str(r["psi01_false_alarm_windows"]), "baseline", None
        ),
        Row('"PSI > 0.1" false alerts', str(r["psi01_false_alerts"]), "baseline", None),
        Row("window samples (median)", str(r["window_samples"]), "", None),
        Row("dispersion (pool resampling)", f"{r['dispersion']:.2f}", "", None),
    ]
    for phase, v in acc.items():
        rows.append(
            Row(
                f"accuracy est/true ({phase})",
                f"{v['estimated']:.3f} / {v['true']:.3f}",
                "within 0.05",
                v["error"] <= 0.05,
            )
        )
    for phase, v in acc.items():
        rows.append(
            Row(
                f"estimate untrusted ({phase})",
                f"{v['untrusted_windows']} / {v['windows']} windows",
                "every window if error > 0.05",
                v["untrusted_windows"] == v["windows"] if v["error"] > 0.05 else None,
            )
        )
    trusted = r["trusted_estimate_max_error"]
    rows += [
        Row(
            "estimated accuracy max error",
            f"{r['estimated_accuracy_max_error']:.3f}",
            "<= 0.05 (every phase)",
            r["estimated_accuracy_max_error"] <= 0.05,
        ),
        Row(
            "trusted estimates' max error",
            "-" if trusted is None else f"{trusted:.3f}",
            "<= 0.05 (every phase)",
            trusted is not None and trusted <= 0.05,
        ),
        Row(
            "uplink bytes / device / period",
            f"{r['uplink_bytes_per_device_period']:.0f} "
            f"(max {r['uplink_bytes_per_device_period_max']})",
            "< 2048",
            r["uplink_bytes_per_device_period_max"] < 2048,
        ),
        Row("uplink bytes / device / hour", f"{r['uplink_bytes_per_device_hour']:.0f}", "", None),
        Row(
            "monitor us / inference (added)",
            f"{r['monitor_overhead']['added_us']:.1f} "
            f"(classify {r['monitor_overhead']['classify_us']:.1f})",
            "",
            None,
        ),
        Row(
            "observe us / inference (fleet)",
            f"{r['monitor_observe_us_per_inference']:.1f}",
            "inference thread",
            None,
        ),
        Row(
            "period close us / device",
            f"{r['monitor_close_us_per_device_period']:.0f}",
            "metrics thread",
            None,
        ),
        Row("run seconds", f"{r['run_s']:.0f}", "< 180", None),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="monitoring", description=__doc__.splitlines()[0])
    ap.add_argument("--periods", type=int, default=Scenario.periods)
    ap.add_argument("--drift-from", type=int, default=Scenario.drift_from)
    ap.add_argument("--rate-hz", type=float, default=Scenario.rate_hz)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dispersion", type=float, help="default: 1 + window samples / pool size")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    args = ap.parse_args(argv)
    scenario = Scenario(
        periods=args.periods,
        drift_from=args.drift_from,
        rate_hz=args.rate_hz,
        seed=args.seed,
        dispersion=args.dispersion,
    )
    with tempfile.TemporaryDirectory(prefix="monitoring-bench-") as tmp:
        result = run(scenario, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if print_rows(rows_of(result)) else 1


if __name__ == "__main__":
    sys.exit(main())
