"""Threshold reached -> signed, gated bundle ready, through the real server and job runner.

Starts the real server (uvicorn in a subprocess, job runner thread, trainer subprocess per job),
creates two digits lines from training configs (``sklearn-mlp`` and ``torch-cnn``, default
hyperparameters, retraining threshold 150), waits for their initial models, then for each line:
registers five devices and uploads drifted field samples (what a fleet whose cameras were knocked
askew sends) in batches of 50. The clock starts when the upload that crosses the threshold is
sent and stops when the retrained challenger has passed its gate (golden + field, per class,
calibration, ONNX parity) *and* its release is signed: the candidate's pending rollout is approved
at once, which signs the manifest. Both stages are printed.

    .venv/bin/python -m benchmarks.training_bench [--threshold 150]

Targets (2-core machine): under 30 s for the sklearn digits line, under 120 s for the torch CNN
line. Exit status 1 if one is missed or a challenger is rejected.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from contract import encode_input
from firmware_sim.services import ServerProcess

DIGITS_SPEC = {"name": "input", "shape": [-1, 64], "dtype": "float32", "min": 0.0, "max": 1.0}
LINES = {"digits-mlp": ("sklearn-mlp", 30.0), "digits-cnn": ("torch-cnn", 120.0)}  # target s
BATCH = 50
DEVICES = 5
POLL_S = 0.05  # seconds between status polls (adds at most this much to each figure)


@dataclass
class Result:
    line: str
    trainer: str
    target_s: float
    initial_s: float
    gated_s: float = float("nan")
    signed_s: float = float("nan")
    passed_gate: bool = False
    reason: str = ""
    train_seconds: float = float("nan")


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(POLL_S)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threshold", type=int, default=150)
    p.add_argument("--workdir", type=Path, help="keep the server's files and log here")
    a = p.parse_args(argv)

    from training.data import digits_pools, drift

    field = digits_pools().field
    X = drift(field.X, severity=1.0, seed=3)
    y = field.y
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="edgeloop-trainbench-") as tmp:
        server = ServerProcess(
            (a.workdir or Path(tmp)) / "server",
            mqtt_port=1,
            env={
                "EDGELOOP_MQTT_ENABLED": "false",
                "EDGELOOP_JOB_POLL_S": "0.1",
                "EDGELOOP_ROLLOUT_TICK_S": "0.5",
            },
        ).start()
        api = f"{server.url}/api/v1"
        c = httpx.Client(timeout=60, headers=server.headers)  # the admin operator
        creds: dict[str, dict[str, str]] = {}
        try:
            for line, (trainer, target) in LINES.items():
                started = time.perf_counter()
                c.post(
                    f"{api}/model-lines",
                    json={
                        "name": line,
                        "config": {"trainer": trainer},
                        "input_spec": DIGITS_SPEC,
                        "labels": [str(i) for i in range(10)],
                        "retrain_threshold": a.threshold,
                    },
                ).raise_for_status()
                wait(
                    f"{line} initial model",
                    lambda line=line: c.get(f"{api}/model-lines/{line}").json()["current_release"],
                    600,
                )
                results.append(Result(line, trainer, target, time.perf_counter() - started))
                token = server.enrollment_token(max_uses=DEVICES)
                for d in range(DEVICES):
                    cred = server.enroll(f"{line}-cam-{d}", line, token=token)
                    creds[f"{line}-cam-{d}"] = {"Authorization": f"Bearer {cred}"}
            for res in results:
                line = res.line
                sent = 0
                t0 = 0.0
                while True:
                    batch = [
                        {
                            "sample_id": f"{line}-{i}",
                            "device_id": f"{line}-cam-{i % DEVICES}",
                            "model_line": line,
                            "model_version": 1,
                            "input_b64": encode_input(X[i]),
                            "true_label": int(y[i]),
                            "predicted_label": int((y[i] + 1) % 10),
                            "confidence": 0.3,
                            "captured_at": time.time(),
                        }
                        for i in range(sent, sent + BATCH)
                    ]
                    t0 = time.perf_counter()
                    out = {"accepted": 0, "rejected": []}
                    for dev in sorted({r["device_id"] for r in batch}):  # each device its own
                        mine = [r for r in batch if r["device_id"] == dev]
                        got = c.post(
                            f"{api}/samples", json={"samples": mine}, headers=creds[dev]
                        ).json()
                        out["accepted"] += got["accepted"]
                        out["rejected"] += got["rejected"]
                    sent += BATCH
                    if out["accepted"] != BATCH:
                        raise RuntimeError(f"samples refused: {out['rejected'][:3]}")
                    jobs = c.get(f"{api}/training-jobs", params={"model_line": line}).json()
                    job = next((j for j in jobs if j["trigger"] == "threshold"), None)
                    if job is not None:
                        break
                job = wait(
                    f"{line} retraining",
                    lambda job=job: (
                        (j := c.get(f"{api}/training-jobs/{job['id']}").json())["status"]
                        in ("succeeded", "rejected", "failed")
                        and j
                    ),
                    600,
                )
                res.gated_s = time.perf_counter() - t0
                version = job.get("result_version")
                if version is not None:
                    v = c.get(f"{api}/model-lines/{line}/versions/{version}").json()
                    res.reason = v["report"].get("reason", "")
                    res.train_seconds = v["report"].get("train_seconds", float("nan"))
                res.passed_gate = job["status"] == "succeeded"
                if not res.passed_gate:
                    res.reason = res.reason or str(job.get("error"))
                    continue
                rollout = next(
                    r
                    for r in c.get(f"{api}/rollouts", params={"model_line": line}).json()
                    if r["to_version"] == version
                )
                approved = c.post(f"{api}/rollouts/{rollout['id']}/approve", json={})
                approved.raise_for_status()
                release = wait(
                    f"{line} signed release",
                    lambda rid=rollout["id"]: c.get(f"{api}/rollouts/{rid}").json()["release"],
                    60,
                )
                env = c.get(f"{api}/model-lines/{line}/releases/{release}").json()["envelope"]
                assert env["signatures"], "release is not signed"
                res.signed_s = time.perf_counter() - t0
        finally:
            c.close()
            server.stop()

    ok = True
    print(
        f"\nThreshold ({a.threshold} samples) -> signed, gated bundle, real server + job runner "
        f"({os.cpu_count()} CPU cores)"
    )
    print(
        f"{'line':<11} {'trainer':<12} {'initial':>8} {'gated':>7} {'signed':>7} "
        f"{'(fit)':>6} {'target':>7}  result"
    )
    for r in results:
        passed = r.passed_gate and r.signed_s < r.target_s
        ok &= passed
        print(
            f"{r.line:<11} {r.trainer:<12} {r.initial_s:>7.1f}s {r.gated_s:>6.1f}s "
            f"{r.signed_s:>6.1f}s {r.train_seconds:>5.1f}s {r.target_s:>6.0f}s  "
            f"{'PASS' if passed else 'FAIL'}"
        )
        if not r.passed_gate:
            print(f"  gate: {r.reason}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
