"""Child side of the fault-injection tests: a zygote that forks real agents to be SIGKILLed.

The zygote imports the agent once, then for each JSON command on stdin forks a child, reports
``{"event": "started", "pid"}`` and, when the child dies, ``{"event": "exit", "pid", "signal"}``.
Forking a pre-imported process keeps hundreds of restarts cheap on a small CI machine; each
child is still a fresh process with nothing but the disk state of its predecessor.

Modes: ``agent`` runs a full Agent with live labelled traffic and reports every model it serves
(``serving``) and any failed inference (``predict_error``); ``spool`` captures samples and reports
each sample id once ``add`` returned (``acked``) while an uploader drains to the test's server.
Run: ``python -m tests.device_agent.crash_child``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from contract.messages import SampleRecord, encode_input
from device_agent import faults
from device_agent.agent import Agent
from device_agent.capture import Spool, Uploader
from device_agent.config import AgentConfig
from device_agent.errors import NoModelError
from device_agent.http import HttpClient
from device_agent.identity import enroll, load_credential
from tests.device_agent.agent_testkit import FEATURES, truth_label


def emit(event: dict[str, Any]) -> None:
    os.write(1, (json.dumps(event) + "\n").encode())


def run_agent(cmd: dict[str, Any]) -> None:
    values = dict(cmd["config"])
    values["state_dir"] = Path(values["state_dir"])
    values["trusted_keys"] = [k.encode() for k in values["trusted_keys"]]
    agent = Agent(AgentConfig(**values))
    agent.start()
    rng = np.random.default_rng(os.getpid())
    period = 1.0 / float(cmd.get("rate_hz", 80))
    truth_seed = int(cmd["truth_seed"])
    last_sha = None
    while True:
        m = agent.manifest
        if m is not None and m.artifact.sha256 != last_sha:
            last_sha = m.artifact.sha256
            emit({"event": "serving", "sha": last_sha, "version": m.model_version})
        x = rng.uniform(0, 16, FEATURES).astype(np.float32)
        try:
            p = agent.predict(x)
        except NoModelError:
            time.sleep(period)
            continue
        except Exception as exc:  # any other failure is a failed inference: the test fails
            emit({"event": "predict_error", "error": f"{type(exc).__name__}: {exc}"})
            time.sleep(period)
            continue
        agent.feedback(p.prediction_id, truth_label(truth_seed, x))
        time.sleep(period)


def run_spool(cmd: dict[str, Any]) -> None:
    directory = Path(cmd["dir"])
    spool = Spool(directory, batch_max=int(cmd["batch_max"]), max_bytes=1 << 30)
    stop = threading.Event()
    values = dict(cmd["config"])
    values["state_dir"] = Path(values["state_dir"])
    values["trusted_keys"] = []
    cfg = AgentConfig(**values)
    client = HttpClient(timeout_s=5.0)
    # The device's own identity, as the agent does it: the stored credential, else enroll.
    credential = load_credential(cfg) or enroll(cfg, client)
    client.set_bearer(credential, origin=cfg.server_url)
    up = Uploader(cfg, spool=spool, client=client, stop=stop)
    threading.Thread(target=up.run, daemon=True).start()
    rng = np.random.default_rng(os.getpid())
    while True:
        sid = uuid.uuid4().hex
        spool.add(
            SampleRecord(
                sample_id=sid,
                device_id=cfg.device_id,
                model_line=cfg.model_line,
                model_version=1,
                input_b64=encode_input(rng.uniform(0, 16, FEATURES).astype(np.float32)),
                true_label=1,
                predicted_label=2,
                confidence=0.5,
                captured_at=time.time(),
            )
        )
        emit({"event": "acked", "id": sid})
        time.sleep(0.002)


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            return
        pid = os.fork()
        if pid == 0:  # the child: arm the crash point, run until killed
            code = 0
            try:
                faults.arm(cmd.get("crash"))
                (run_spool if cmd["cmd"] == "spool" else run_agent)(cmd)
            except BaseException as exc:
                emit({"event": "child_error", "error": f"{type(exc).__name__}: {exc}"})
                code = 1
            finally:
                os._exit(code)
        emit({"event": "started", "pid": pid})
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        emit({"event": "exit", "pid": pid, "signal": sig})


if __name__ == "__main__":
    main()
