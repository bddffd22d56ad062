"""The closed loop, end to end, on real parts: ``python -m firmware_sim.demo``.

Starts its own Mosquitto and edgeloop server, boots a fleet of simulated devices (each a real
agent with its own MQTT session), and walks the loop: healthy fleet -> drift -> label-free drift
alert and misclassified samples flowing in -> threshold -> retraining -> gate -> signing ->
operator approval (through the ``edgeloop`` CLI) -> canary -> full rollout. Prints a summary and
exits non-zero when the loop did not close or did not help.

Monitoring runs on a demo time scale: the agents send a histogram summary every
``--monitor-period`` seconds and the server judges windows of ``--monitor-window`` seconds
(production defaults: 60 s and 300 s), so a drift alert can come within seconds. The summary says
when the first drift alert was raised and when the retraining threshold was reached, both
counted from the moment the drift began, and says so plainly when the alert came later or not at
all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from device_agent import AgentConfig
from firmware_sim.fleet import Fleet, FleetConfig, Inputs, Tally
from firmware_sim.services import Mosquitto, ServerProcess
from server.db.job_queue import ACTIVE_JOB_STATES  # queued, running, trained: not done yet

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"


class LoopDidNotClose(RuntimeError):
    """The demo's loop stopped somewhere; the message says where."""


HTTP_TIMEOUT_S = 30.0  # seconds one API call may take before it is retried
HTTP_TRIES = 4  # attempts of one read-only API call (a loaded machine can be slow, not down)
MAX_TRAININGS = 3  # challengers the gate may reject in a row before the demo gives up
# Monitoring on the demo's time scale. A drift verdict needs a window's samples (here the fleet's
# traffic of one window: 24 devices x 4/s x 1 s = 96), two breaching windows raise the alert
# (the production rule: about 1e-4 false alerts per clean window), and a window is judged
# MONITOR_CLOSE_DELAY_S after it ends (the summaries still in the ingest writer's batch).
MONITOR_CLOSE_DELAY_S = 0.5  # seconds
MONITOR_TICK_S = 0.25  # seconds between the evaluator's looks
MONITOR_MIN_SAMPLES = 30  # samples a window needs to count toward an alert (drift, estimate)
# The simulator resamples a 497-image field pool: a window of ~100 carries the pool's own
# sampling error too, ~1 + 100 / 497 more variance than independent images (benchmarks/monitoring)
DRIFT_DISPERSION = 1.25
DRIFT_NULL_DRAWS = 20_000  # resamples per calibrated threshold (the default 40,000 costs twice)
LABEL_FREE_RULES = ("drift", "estimated_accuracy")  # alerts that need no label
ALERT_WAIT_S = 60.0  # seconds phase 3 waits for a label-free alert (or the threshold)


def num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a"


def say(msg: str) -> None:
    print(msg, flush=True)


CURRENT_PHASE = ["starting"]  # what the demo was doing, for the failure message


def phase(n: int, title: str) -> None:
    CURRENT_PHASE[0] = f"[{n}] {title}"
    say(f"\n{BOLD}[{n}] {title}{RESET}")


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, every: float = 0.5, *, fail: bool = True
) -> Any:
    """``check()``'s first truthy value; at the timeout LoopDidNotClose (``fail=False``: None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    if not fail:
        return None
    raise LoopDidNotClose(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Options:
    devices: int
    threshold: int
    canary_percent: int
    rate_hz: float
    measure_rounds: int
    trainer: str
    workdir: Path | None
    keep: bool
    timeout_s: float
    monitor_window_s: float = 1.0  # seconds per server monitoring window
    monitor_period_s: float = 1.0  # seconds per agent summary (as often as the metrics reports)
    label_fraction: float = 0.5  # share of inferences whose true label a device learns


@dataclass
class Timeline:
    """When things happened after the drift began (seconds; None: not seen)."""

    drift_at: float  # unix seconds (this machine's clock, which the server shares)
    alert: dict[str, Any] | None = None  # the first label-free alert raised after drift_at
    alert_s: float | None = None
    threshold_s: float | None = None

    def lines(self, threshold: int) -> list[tuple[str, str]]:
        """The summary's rows: when the alert was raised, when the threshold was reached."""
        a = self.alert
        alert = (
            f"t+{self.alert_s:.1f} s (rule {a['rule']}, group {a['group']}, v{a['model_version']})"
            if a is not None and self.alert_s is not None
            else "not raised"
        )
        reached = f"t+{self.threshold_s:.1f} s" if self.threshold_s is not None else "not reached"
        return [
            ("drift alert raised (no labels needed)", alert),
            (f"retraining threshold ({threshold} samples) reached", reached),
        ]

    def verdict(self) -> tuple[bool, str]:
        """(the alert came first, a sentence that says what happened)."""
        if self.alert_s is None:
            return False, "No drift alert was raised after the drift began."
        if self.threshold_s is None:
            return True, "The drift alert was raised; the retraining threshold was never reached."
        gap = self.threshold_s - self.alert_s
        if gap > 0:
            return True, (
                f"The drift alert came {gap:.1f} s before the threshold of wrong or unsure "
                "samples was reached."
            )
        return False, (
            f"The drift alert came {-gap:.1f} s AFTER the threshold of wrong or unsure samples "
            "was reached: on this run the labels were faster."
        )


class DemoFleet(Fleet):
    """The simulated fleet, with the agents' monitoring period on the demo's time scale."""

    def __init__(self, config: FleetConfig, inputs: Inputs, monitor_period_s: float) -> None:
        super().__init__(config, inputs)
        self.monitor_period_s = monitor_period_s

    def agent_config(self, index: int) -> AgentConfig:
        return dataclasses.replace(
            super().agent_config(index), monitor_interval_s=self.monitor_period_s
        )


def unix(iso: str) -> float:
    """Unix seconds of an API timestamp (ISO 8601; UTC when it names no zone)."""
    t = datetime.fromisoformat(iso)
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


class Demo:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.root = opts.workdir or Path(tempfile.mkdtemp(prefix="edgeloop-demo-"))
        # The broker runs with the server-generated password file and ACL (no anonymous login;
        # each device reads and writes only its own topics).
        self.broker_auth = self.root / "broker-auth"
        self.broker = Mosquitto(self.root / "mosquitto", auth_dir=self.broker_auth)
        self.server: ServerProcess | None = None
        self.fleet: Fleet | None = None
        self.admin_token = secrets.token_urlsafe(24)  # the demo's bootstrap admin
        self.http = httpx.Client(
            timeout=HTTP_TIMEOUT_S, headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        self.rollout_id: int | None = None  # the rollout being watched, for a failure report
        self._canary_left_at: float | None = None  # when the watched rollout left its canary
        self.failed = False  # a failed run keeps its work directory
        self.operator_token = self.admin_token  # what the CLI uses; an approver's, once made
        self.v_old: int | None = None  # the version that serves when the drift begins
        self.timeline: Timeline | None = None

    # Server API helpers ----------------------------------------------------------------------

    @property
    def api(self) -> str:
        assert self.server is not None
        return f"{self.server.url}/api/v1"

    def get(self, path: str) -> Any:
        """GET an API path; transport errors and 5xx are retried (reads are idempotent), then
        reported as LoopDidNotClose naming the call."""
        last = ""
        for attempt in range(HTTP_TRIES):
            try:
                r = self.http.get(f"{self.api}{path}")
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc or 'no response'}"
            else:
                if r.status_code < 500:
                    if r.is_error:
                        raise LoopDidNotClose(
                            f"GET {path} answered HTTP {r.status_code}: {r.text[:300]}"
                        )
                    return r.json()
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            time.sleep(min(2.0**attempt, 5.0))
        raise LoopDidNotClose(f"GET {path} failed {HTTP_TRIES} times; last: {last}")

    def line(self) -> dict[str, Any]:
        return self.get("/model-lines/digits")

    def cli(self, *args: str) -> str:
        """Run the operator CLI, exactly as a person would."""
        assert self.server is not None
        cmd = [
            sys.executable,
            "-m",
            "server.cli.main",
            "--server",
            self.server.url,
            "--token",
            self.operator_token,
            *args,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise LoopDidNotClose(f"`edgeloop {' '.join(args)}` took over 120 s") from exc
        if done.returncode != 0:
            raise LoopDidNotClose(
                f"`edgeloop {' '.join(args)}` failed: {done.stderr or done.stdout}"
            )
        return done.stdout

    # The loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        o = self.o
        t_start = time.monotonic()
        phase(0, "Control plane: Mosquitto, edgeloop server, initial model")
        # The line's training config. The demo's drift is severe, and a challenger trained on
        # a thousand drifted samples gives up one or two of the golden set's 32 sevens in
        # about a third of the runs measured here (25/32 against the default floor of 25.2/32,
        # recall drop 0.15) while it wins field accuracy from 0.03 to 0.9: the demo's operator
        # accepts a per-class golden recall drop of 0.25. Every other bound is the default.
        line_config = self.root / "line-config.json"
        self.root.mkdir(parents=True, exist_ok=True)
        line_config.write_text(
            json.dumps({"trainer": o.trainer, "gate": {"max_class_recall_drop": 0.25}})
        )
        self.server = ServerProcess(
            self.root / "server",
            mqtt_port=self.broker.port,
            env={
                "EDGELOOP_BOOTSTRAP_LINE": "digits",
                "EDGELOOP_BOOTSTRAP_CONFIG": str(line_config),
                "EDGELOOP_RETRAIN_THRESHOLD": str(o.threshold),
                "EDGELOOP_CANARY_PERCENT": str(o.canary_percent),
                "EDGELOOP_MIN_LABELLED": "60",
                # The demo's drift is severe: the champion is near chance on some classes and a
                # retrained model can trade one of them away (e.g. recall 0.25 -> 0.0) while it
                # wins overall. The default 0.10 per-class bound stops that; the demo allows 0.5.
                "EDGELOOP_MAX_CLASS_RECALL_DROP": "0.5",
                "EDGELOOP_CANARY_MIN_SOAK_S": "4",
                "EDGELOOP_ROLLOUT_TICK_S": "1",
                "EDGELOOP_ADMIN_TOKEN": self.admin_token,
                "EDGELOOP_BROKER_CONFIG_DIR": str(self.broker_auth),
                "EDGELOOP_BROKER_PID_FILE": str(self.broker.pid_file),
                "EDGELOOP_MQTT_USERNAME": "edgeloop-server",
                "EDGELOOP_MQTT_PASSWORD": secrets.token_urlsafe(24),
                # Monitoring on the demo's time scale (see MONITOR_* above). Latency and error
                # rate are left out: on a shared laptop p95 latency is the neighbours' noise.
                "EDGELOOP_MONITOR_WINDOW_S": str(o.monitor_window_s),
                "EDGELOOP_MONITOR_CLOSE_DELAY_S": str(MONITOR_CLOSE_DELAY_S),
                "EDGELOOP_MONITOR_TICK_S": str(MONITOR_TICK_S),
                "EDGELOOP_DRIFT_DISPERSION": str(DRIFT_DISPERSION),
                "EDGELOOP_DRIFT_NULL_DRAWS": str(DRIFT_NULL_DRAWS),
                "EDGELOOP_ALERT_RULES": json.dumps([*LABEL_FREE_RULES, "live_accuracy"]),
                "EDGELOOP_ALERT_POLICIES": json.dumps(
                    {rule: {"min_samples": MONITOR_MIN_SAMPLES} for rule in LABEL_FREE_RULES}
                ),
            },
        ).start()
        say(f"  server on {self.server.url} (data in {self.server.data_dir})")
        # The server wrote passwd + acl at start; the broker loads them and is SIGHUPed on
        # every enroll/revoke.
        wait_for("the broker files", (self.broker_auth / "passwd").exists, timeout=30)
        self.broker.start()
        say(f"  mosquitto on 127.0.0.1:{self.broker.port} (password file + ACL, no anonymous)")
        v1 = wait_for(
            "the initial model (v1) to be trained, signed and released",
            lambda: (ln := self.line()).get("champion_version") and ln,
            timeout=300,
        )
        say(f"  model line 'digits': v{v1['champion_version']}, release {v1['current_release']}")
        self.v_old = v1["champion_version"]
        # The operator who will approve the rollout gets their token now, as a person would
        # before they are needed (the bootstrap admin cannot be everyone's login).
        made = self.cli("tokens", "create", "--name", "demo-approver", "--role", "approver")
        self.operator_token = made.strip().splitlines()[-1]
        say(DIM + "  $ edgeloop tokens create --name demo-approver --role approver" + RESET)
        say("  building the field inputs (clean and drifted with torchvision) ...")
        inputs = Inputs.build()

        phase(
            1, f"Fleet: {o.devices} simulated devices, each a real agent with its own MQTT session"
        )
        self.fleet = DemoFleet(
            FleetConfig(
                server_url=self.server.url,
                mqtt_host="127.0.0.1",
                mqtt_port=self.broker.port,
                trusted_keys=[],
                trusted_root=self.server.root_path.read_bytes(),
                state_root=self.root / "devices",
                devices=o.devices,
                metrics_interval_s=1.0,
                bootstrap_token=self.server.enrollment_token(max_uses=o.devices),
                label_fraction=o.label_fraction,
            ),
            inputs,
            o.monitor_period_s,
        )
        self.fleet.start()
        if not self.fleet.wait_ready(120):
            raise LoopDidNotClose("devices did not install the initial model")
        say(f"  all {o.devices} devices verified and serve v{v1['champion_version']}")

        phase(2, f"Healthy fleet: clean inputs, {o.rate_hz:g} inferences per device per second")
        if o.label_fraction < 1.0:
            say(
                f"  a device learns the true label of {o.label_fraction:.0%} of its inferences"
                " (labels are scarce in the field; drift monitoring needs none)"
            )
        fleet = self.fleet
        fleet.start_traffic(o.rate_hz)
        healthy = self._measure(o.devices * o.measure_rounds)
        say(f"  fleet accuracy {healthy.accuracy:.3f} over {healthy.predictions} predictions")
        say(
            f"  monitoring (summaries every {o.monitor_period_s:g} s, windows of "
            f"{o.monitor_window_s:g} s): {self._quiet()}"
        )

        phase(3, "Drift: the cameras are knocked askew and lose focus (rotation, blur, contrast)")
        fleet.take_tally()
        fleet.drifted = True
        timeline = Timeline(drift_at=time.time())
        self.timeline = timeline
        say("  the fleet's inputs drift now (t+0); the server sees only histograms, no labels")
        alert_wait_s = min(o.timeout_s, ALERT_WAIT_S)
        wait_for(
            "a label-free alert or the retraining threshold",
            lambda: self._look(timeline) or self._threshold_job(timeline),
            timeout=alert_wait_s,
            every=0.25,
            fail=False,
        )
        if timeline.alert is None and timeline.threshold_s is not None:
            came = f"t+{timeline.threshold_s:.1f} s"
            say(f"  no drift alert yet: the retraining threshold came first ({came})")
        elif timeline.alert is None:
            say(f"  no drift alert in the first {alert_wait_s:.0f} s after the drift began")

        phase(4, f"Misclassified samples flow to the server (retraining threshold {o.threshold})")
        job = wait_for(
            "the retraining threshold to be hit",
            lambda: self._threshold_job(timeline),
            timeout=o.timeout_s,
            every=0.25,
        )
        t_threshold = time.monotonic()
        drifted_old = fleet.take_tally()
        say(f"  fleet accuracy under drift, old model: {RED}{drifted_old.accuracy:.3f}{RESET}")
        say(
            f"  threshold reached t+{timeline.threshold_s:.1f} s: training job #{job['id']} "
            f"queued ({job.get('trigger')})"
        )
        self._look(timeline)  # an alert raised since

        phase(5, "Retraining, golden-set gate, ONNX export and parity, signing")
        job = self._train_until_a_challenger_passes(job)
        version = self.get(f"/model-lines/digits/versions/{job['result_version']}")
        self._print_gate(version)

        t_signed = time.monotonic()

        phase(6, "Staged rollout waits for an operator; approving with the edgeloop CLI")
        rollout = wait_for(
            "a rollout pending approval",
            lambda: next(
                (
                    r
                    for r in self.get("/rollouts?model_line=digits")
                    if r["state"] == "pending_approval"
                ),
                None,
            ),
            timeout=60,
        )
        say(
            f"  rollout #{rollout['id']}: v{rollout['from_version']} -> v{rollout['to_version']}, "
            f"state {rollout['state']}"
        )
        try:
            out = self.cli("rollouts", "approve", str(rollout["id"]))
        except LoopDidNotClose as exc:
            # A client that timed out does not know whether its approval took (a loaded server
            # may answer late): look, as an operator would, before calling it a failure.
            if self.get(f"/rollouts/{rollout['id']}")["state"] == "pending_approval":
                raise
            out = f"(the CLI gave up waiting: {exc}; the rollout shows the approval took)"
        say(
            DIM
            + "  $ edgeloop --token $APPROVER_TOKEN rollouts approve "
            + str(rollout["id"])
            + "\n"
            + "\n".join("  " + ln for ln in out.strip().splitlines())
            + RESET
        )
        state = self.get(f"/rollouts/{rollout['id']}")["state"]
        if state == "pending_approval":
            raise LoopDidNotClose(f"rollout #{rollout['id']} is still pending after approval")

        t_approved = time.monotonic()

        phase(7, f"Canary ({o.canary_percent}% of the fleet), gated on live metrics, then everyone")
        self.rollout_id = rollout["id"]
        final = self._watch_rollout(rollout["id"])
        if final["state"] == "paused":
            raise LoopDidNotClose(
                f"rollout #{rollout['id']} paused for an operator (resume or roll back): "
                f"{final.get('reason')}"
            )
        if final["state"] != "completed":
            raise LoopDidNotClose(
                f"rollout #{rollout['id']} ended {final['state']}: {final.get('reason')}"
            )
        t_done = time.monotonic()
        t_canary = self._canary_left_at or t_done
        stages = (
            f"training, gate, signing {t_signed - t_threshold:.1f} s; approval "
            f"{t_approved - t_signed:.1f} s; canary {t_canary - t_approved:.1f} s; "
            f"the rest {t_done - t_canary:.1f} s"
        )
        fleet = self.fleet
        fleet.stop_traffic()
        new_version = final["to_version"]
        wait_for(
            f"every device to serve v{new_version}",
            lambda: all(v == new_version for v in fleet.versions().values()),
            timeout=60,
        )

        phase(8, "After the update: drifted inputs, new model")
        after = self.fleet.run_rounds(o.measure_rounds, drifted=True)
        say(f"  fleet accuracy under drift, new model: {GREEN}{after.accuracy:.3f}{RESET}")
        self._look(timeline)  # an alert that came after the threshold

        return self._summary(
            timeline,
            healthy,
            drifted_old,
            after,
            v1["champion_version"],
            new_version,
            t_done - t_threshold,
            stages,
            time.monotonic() - t_start,
        )

    def _train_until_a_challenger_passes(self, job: dict[str, Any]) -> dict[str, Any]:
        """Follow the line's threshold trainings until one passes the gate.

        A challenger the gate rejects is not the end of the loop: it is registered as rejected,
        the fleet keeps sending samples, and the next threshold trains again on more of them.
        """
        for _ in range(MAX_TRAININGS):
            job_id = job["id"]

            def finished(job_id: int = job_id) -> dict[str, Any] | None:
                got: dict[str, Any] = self.get(f"/training-jobs/{job_id}")
                return got if got["status"] not in ACTIVE_JOB_STATES else None

            job = wait_for(f"training job #{job_id} to finish", finished, self.o.timeout_s)
            if job["status"] == "succeeded":
                return job
            if job["status"] != "rejected":
                raise LoopDidNotClose(f"training job ended {job['status']}: {job.get('error')}")
            say(f"  challenger v{job.get('result_version')} {job.get('error')}")
            say(
                "  the loop goes on: the fleet keeps sending samples; waiting for the next training"
            )
            done = job["id"]

            def next_threshold_job(done: int = done) -> dict[str, Any] | None:
                jobs: list[dict[str, Any]] = self.get("/training-jobs?model_line=digits")
                return next(
                    (j for j in jobs if j.get("trigger") == "threshold" and j["id"] > done), None
                )

            job = wait_for(
                "the next threshold training",
                next_threshold_job,
                timeout=self.o.timeout_s,
                every=0.25,
            )
            say(f"  threshold reached again: training job #{job['id']} queued")
        raise LoopDidNotClose(f"{MAX_TRAININGS} challengers in a row failed the gate")

    def _threshold_job(self, timeline: Timeline) -> dict[str, Any] | None:
        jobs = self.get("/training-jobs?model_line=digits")
        job = next((j for j in jobs if j.get("trigger") == "threshold"), None)
        if job is not None and timeline.threshold_s is None:
            timeline.threshold_s = unix(job["created_at"]) - timeline.drift_at
        return job

    def _measure(self, predictions: int) -> Tally:
        """The background traffic's tally from now until it holds ``predictions``."""
        assert self.fleet is not None
        fleet, total = self.fleet, Tally()
        fleet.take_tally()

        def enough() -> bool:
            t = fleet.take_tally()
            total.predictions += t.predictions
            total.correct += t.correct
            total.failed += t.failed
            return total.predictions >= predictions

        wait_for(f"{predictions} predictions", enough, timeout=self.o.timeout_s, every=0.25)
        return total

    def _quiet(self) -> str:
        """What monitoring made of the clean traffic so far: windows judged, the highest drift
        ratio (1 is the calibrated threshold) and any alert raised."""
        windows = self.get("/model-lines/digits/monitoring/windows?group=*&limit=500")
        ratios = [w["drift_ratio"] for w in windows if w.get("drift_ratio") is not None]
        alerts = self.get("/alerts?model_line=digits")
        said = (
            f"{len(windows)} windows judged, highest drift ratio "
            f"{max(ratios):.2f} (alert threshold 1)"
            if ratios
            else f"{len(windows)} windows judged, none scored yet"
        )
        if not alerts:
            return said + ", no alert"
        return (
            said
            + ", alerts on clean traffic: "
            + ", ".join(f"#{a['id']} {a['rule']} (group {a['group']})" for a in alerts)
        )

    def _look(self, timeline: Timeline) -> bool:
        """Find the first label-free alert on the old version raised after the drift began
        (drift first on a tie) and say what it showed; True once found."""
        if timeline.alert is not None:
            return True
        alerts = [
            a
            for a in self.get("/alerts?model_line=digits")
            if a["rule"] in LABEL_FREE_RULES
            and a["model_version"] == self.v_old
            and unix(a["raised_at"]) >= timeline.drift_at
        ]
        if not alerts:
            return False
        first = min(alerts, key=lambda a: (unix(a["raised_at"]), a["rule"] != "drift", a["id"]))
        timeline.alert = first
        timeline.alert_s = unix(first["raised_at"]) - timeline.drift_at
        f = self.get(f"/alerts/{first['id']}").get("figures") or {}
        drift = f.get("drift") or {}
        drifted = drift.get("drifted") or []
        say(
            f"  t+{timeline.alert_s:.1f} s: {first['rule']} alert #{first['id']} raised for "
            f"v{first['model_version']}, group {first['group']} ({f.get('samples')} samples "
            f"in the window; {len(drifted)} of {len(drift.get('scores') or [])} signals over "
            f"their thresholds; estimated accuracy {num(f.get('estimated_accuracy'))}, "
            f"reference {num(f.get('reference_accuracy'))})"
        )
        return True

    def _print_gate(self, version: dict[str, Any]) -> None:
        report = version.get("report") or {}
        m = report.get("metrics", {})
        ch, cp = m.get("challenger") or {}, m.get("champion") or {}
        ds = report.get("dataset", {})
        version_id = str(report.get("dataset_version", "?"))[:16]
        say(
            f"  dataset {version_id}: {ds.get('base_count')} base + {ds.get('sample_count')} "
            f"field samples ({ds.get('field_eval_count')} held out for evaluation)"
        )
        for name, key in (
            ("golden holdout", "golden_accuracy"),
            ("recent field", "field_accuracy"),
        ):
            if ch.get(key) is not None:
                say(
                    f"  {name + ' accuracy:':<26} champion {num(cp.get(key))}, "
                    f"challenger {num(ch.get(key))}"
                )
        par = report.get("parity", {})
        say(
            f"  ONNX Runtime parity: argmax agreement {par.get('argmax_agreement')}, "
            f"max |diff| {par.get('max_abs_diff')}"
        )
        say(
            f"  gate: {report.get('reason')} -> v{version['version']} ({version.get('status')}), "
            f"signed"
        )

    def _watch_rollout(self, rollout_id: int) -> dict[str, Any]:
        assert self.fleet is not None
        last = None
        deadline = time.monotonic() + self.o.timeout_s
        while time.monotonic() < deadline:
            r = self.get(f"/rollouts/{rollout_id}")
            versions = self.fleet.versions()
            on_new = sum(v == r["to_version"] for v in versions.values())
            line = f"  {r['state']:<11} devices on v{r['to_version']}: {on_new}/{len(versions)}"
            if r.get("reason"):
                line += f"  ({r['reason']})"
            if line != last:
                say(line)
                last = line
            if r["state"] != "canary" and self._canary_left_at is None:
                self._canary_left_at = time.monotonic()  # the canary wave's gates held
            if r["state"] in ("completed", "rolled_back", "aborted"):
                return r
            if r["state"] == "paused":
                # The engine paused for an operator's decision (resume or roll back): the demo
                # has no operator to ask, so it stops here and says why rather than wait out
                # its timeout.
                return r
            time.sleep(0.5)
        raise LoopDidNotClose(f"rollout #{rollout_id} did not finish in {self.o.timeout_s:.0f}s")

    def _summary(
        self,
        timeline: Timeline,
        healthy: Tally,
        drifted_old: Tally,
        after: Tally,
        v_old: int,
        v_new: int,
        loop_s: float,
        stages: str,
        total_s: float,
    ) -> int:
        closed = after.accuracy > drifted_old.accuracy and not math.isnan(after.accuracy)
        say(f"\n{BOLD}Summary{RESET}")
        rows = [
            ("devices", f"{self.o.devices}"),
            (f"fleet accuracy before drift (v{v_old})", f"{healthy.accuracy:.3f}"),
            (f"fleet accuracy under drift, old model (v{v_old})", f"{drifted_old.accuracy:.3f}"),
            (f"fleet accuracy under drift, new model (v{v_new})", f"{after.accuracy:.3f}"),
            ("versions", f"v{v_old} -> v{v_new}"),
            ("threshold -> full fleet updated", f"{loop_s:.1f} s"),
            ("  of which", stages),
            ("demo wall time", f"{total_s:.1f} s"),
            ("failed inferences", f"{healthy.failed + drifted_old.failed + after.failed}"),
            *timeline.lines(self.o.threshold),
        ]
        for label, value in rows:
            say(f"  {label:<48} {value}")
        first, sentence = timeline.verdict()
        say(f"{GREEN if first else RED}{sentence}{RESET}")
        if closed:
            say(f"{GREEN}{BOLD}The loop closed: the fleet recovered from drift by itself.{RESET}")
            return 0
        say(f"{RED}{BOLD}The update did not improve accuracy under drift.{RESET}")
        return 1

    def report_failure(self, exc: BaseException) -> None:
        """Say which phase failed and why, the rollout's state, the server log's last lines
        and where the work directory (kept) and the full traceback are."""
        self.failed = True
        what = str(exc) if isinstance(exc, LoopDidNotClose) else f"{type(exc).__name__}: {exc}"
        say(f"\n{RED}{BOLD}The loop did not close in phase {CURRENT_PHASE[0]}:{RESET}")
        say(f"{RED}  {what}{RESET}")
        if self.rollout_id is not None and self.server is not None:
            try:
                r = self.http.get(f"{self.api}/rollouts/{self.rollout_id}", timeout=10).json()
                say(
                    f"  rollout #{self.rollout_id}: state {r.get('state')}, "
                    f"v{r.get('from_version')} -> v{r.get('to_version')}; {r.get('reason') or ''}"
                )
            except (httpx.HTTPError, ValueError) as err:
                say(f"  rollout #{self.rollout_id}: state unknown ({type(err).__name__}: {err})")
        if self.fleet is not None:
            versions = self.fleet.versions()
            counts: dict[Any, int] = {}
            for v in versions.values():
                counts[v] = counts.get(v, 0) + 1
            say(
                "  devices by version: "
                + ", ".join(f"v{v}: {n}" for v, n in sorted(counts.items(), key=str))
            )
        if self.server is not None:
            say(f"{DIM}server log, last lines:\n{self.server.log_tail(30)}{RESET}")
        trace = self.root / "demo-error.txt"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            trace.write_text("".join(traceback.format_exception(exc)))
            say(f"  work directory kept: {self.root} (traceback in {trace.name})")
        except OSError:
            say(f"  work directory kept: {self.root}")

    def close(self) -> None:
        if self.fleet:
            self.fleet.stop()
        if self.server:
            self.server.stop()
        self.broker.stop()
        self.http.close()
        if not self.failed and not self.o.keep and self.o.workdir is None:
            shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    # The agents log every rejected sample and retry; the demo prints its own progress instead.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    p = argparse.ArgumentParser(prog="edgeloop-sim", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=24)
    p.add_argument("--threshold", type=int, default=300, help="samples that trigger retraining")
    p.add_argument("--canary-percent", type=int, default=20)
    p.add_argument("--rate", type=float, default=4.0, help="inferences per device per second")
    p.add_argument(
        "--measure-rounds", type=int, default=40, help="inferences per device per measurement"
    )
    p.add_argument(
        "--trainer", default="sklearn-mlp", choices=["sklearn-mlp", "sklearn-logreg", "torch-cnn"]
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep state here instead of a temp dir"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, databases)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any one phase may take")
    p.add_argument(
        "--monitor-window", type=float, default=1.0, help="seconds per server monitoring window"
    )
    p.add_argument(
        "--monitor-period", type=float, default=1.0, help="seconds per device monitoring summary"
    )
    p.add_argument(
        "--label-fraction",
        type=float,
        default=0.5,
        help="share of inferences whose true label a device learns (a QC station samples)",
    )
    a = p.parse_args(argv)
    if not 0.0 < a.label_fraction <= 1.0:
        p.error(f"--label-fraction must be within (0, 1], got {a.label_fraction:g}")
    # The server refuses windows under 1 s (EDGELOOP_MONITOR_WINDOW_S); say so before starting it.
    if not 1.0 <= a.monitor_window <= 86_400.0:
        p.error(f"--monitor-window must be within 1..86400 seconds, got {a.monitor_window:g}")
    if not 0.0 < a.monitor_period <= 3600.0:
        p.error(f"--monitor-period must be within (0, 3600] seconds, got {a.monitor_period:g}")
    demo = Demo(
        Options(
            a.devices,
            a.threshold,
            a.canary_percent,
            a.rate,
            a.measure_rounds,
            a.trainer,
            a.workdir,
            a.keep,
            a.timeout,
            a.monitor_window,
            a.monitor_period,
            a.label_fraction,
        )
    )
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the broker, the server and the
    # agents it started are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return demo.run()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the front door: a clear message and the evidence, no traceback
        demo.report_failure(exc)
        return 1
    finally:
        demo.close()


if __name__ == "__main__":
    raise SystemExit(main())
