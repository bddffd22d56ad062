"""A stand-in for ``python -m training``: honours the spec contract, trains nothing.

Modes: ``pass`` writes a valid ONNX (MatMul + Softmax, input "input" [N,64], output
"probabilities" [N,10]) and a passing report; ``fail`` the same with passed=false; ``crash``
exits 3 with a message on stderr and writes nothing; ``badspec`` exits 2 (invalid spec);
``killonce`` SIGKILLs itself on a job's first attempt and passes afterwards; ``slow`` sleeps
``FAKE_TRAINER_SLEEP_S`` seconds (default 3) and then passes.

Every run appends ``job_id attempt-dir`` to ``FAKE_TRAINER_RUNS`` when that is set, so a test
can prove that a job was trained exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_onnx(seed: int) -> bytes:
    w = np.random.default_rng(seed).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "fake",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    out = Path(spec["output_dir"])
    runs = os.environ.get("FAKE_TRAINER_RUNS")
    if runs:
        with open(runs, "a") as f:
            f.write(f"{spec['job_id']} {out.name}\n")
    # What the job runner asked of the trainer's environment (tests/server/test_retrain_*).
    (out / "env.json").write_text(
        json.dumps({"EDGELOOP_TRAINER_NICE": os.environ.get("EDGELOOP_TRAINER_NICE")})
    )
    if args.mode == "crash":
        print("fake trainer: simulated crash (out of memory)", file=sys.stderr)
        return 3
    if args.mode == "badspec":
        print("training: invalid spec: seed must be an integer", file=sys.stderr)
        return 2
    if args.mode == "killonce" and out.name == "attempt-1":
        print("fake trainer: about to be killed", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if args.mode == "slow":
        time.sleep(float(os.environ.get("FAKE_TRAINER_SLEEP_S", "3")))
    n = 0
    if spec["samples_path"]:
        data = np.load(spec["samples_path"])
        n = int(data["X"].shape[0])
        assert data["X"].dtype == np.float32 and data["X"].shape[1] == 64
        assert data["y"].dtype == np.int64
    (out / "model.onnx").write_bytes(build_onnx(spec["seed"]))
    passed = args.mode != "fail"
    report = {
        "passed": passed,
        "reason": "gate passed" if passed else "golden accuracy dropped 0.08 > 0.03",
        "dataset_version": f"fake-{spec['job_id']}-{n}",
        "dataset": {
            "base": "digits-train",
            "base_count": 1000,
            "sample_count": n,
            "train_count": 1000 + n,
            "field_eval_count": 0,
        },
        "metrics": {
            "challenger": {"golden_accuracy": 0.95, "field_accuracy": None},
            "champion": spec["champion"] and {"golden_accuracy": 0.94, "field_accuracy": None},
        },
        "parity": {"argmax_agreement": 1.0, "max_abs_diff": 0.0, "passed": True},
        "trainer": spec["trainer"],
        "hyperparams": spec["hyperparams"],
        "seed": spec["seed"],
        "train_seconds": 0.01,
        "spec_seen": {"champion": spec["champion"], "gate": spec["gate"]},
    }
    (out / "report.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
