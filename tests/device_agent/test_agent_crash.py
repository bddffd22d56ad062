"""Fault injection: SIGKILL the agent at randomized points across whole updates, 200+ times.

Kill points combine named crash points (``EDGELOOP_AGENT_CRASH_AT=<point>:<n>``, the agent kills
itself: mid-download, mid-write, before activation, between persisting and swapping, on
probation, while committing) with random delays (the test kills from outside). After every kill
the disk must hold only verified models behind the slot pointers and no partial file in
``models/``; every restart must serve a verified model, no inference may fail, and every update
must settle: committed, or cleanly refused/rolled back (a worse model never commits).

Seeded: set ``EDGELOOP_CRASH_SEED`` to replay a run (the seed is printed).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from contract.messages import DeviceState
from device_agent.capture import Spool, Uploader
from device_agent.store import ModelStore, sha256_file
from device_agent.verify import load_trusted_keys, verify_installed
from tests.device_agent.agent_testkit import (
    FAKE_BOOTSTRAP_TOKEN,
    LINE,
    FakeServer,
    device_http,
    make_big_model,
    make_config,
    make_manifest,
    make_target,
    public_pem,
    sha256,
    wait_until,
)

KILLS = int(os.environ.get("EDGELOOP_CRASH_KILLS", "200"))
TRUTH = 1  # ground truth = the predictions of model weights seed 1
SETTLED = {"committed", "rolled_back", "refused", "already_installed"}


class Zygote:
    """Drives ``crash_child``: one child at a time, killed by itself or by us."""

    def __init__(self, log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.device_agent.crash_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=Path(__file__).resolve().parents[2],
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def next_event(self, timeout: float = 60.0) -> dict[str, Any]:
        return self.events.get(timeout=timeout)

    def close(self) -> None:
        try:
            self.send({"cmd": "quit"})
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Run:
    """One child's life: start it, collect its events, kill it."""

    def __init__(self, zygote: Zygote, cmd: dict[str, Any]) -> None:
        self.z = zygote
        self.events: list[dict[str, Any]] = []
        zygote.send(cmd)
        ev = zygote.next_event()
        while ev["event"] != "started":
            self.events.append(ev)
            ev = zygote.next_event()
        self.pid = int(ev["pid"])
        self.exit: dict[str, Any] | None = None

    def pump(self, timeout: float) -> bool:
        """Collect events for up to ``timeout`` s; True once the child has exited."""
        deadline = time.monotonic() + timeout
        while self.exit is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                ev = self.z.next_event(timeout=left)
            except queue.Empty:
                return False
            if ev["event"] == "exit" and ev["pid"] == self.pid:
                self.exit = ev
            else:
                self.events.append(ev)
        return True

    def kill(self) -> None:
        if self.exit is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            assert self.pump(30), "child did not exit after SIGKILL"

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


def check_disk(store: ModelStore, trusted: list[Any], known: set[str]) -> Any:
    """The power-loss invariants, checked after every kill."""
    assert not store.state_path.with_suffix(".corrupt").exists(), "state.json was torn"
    st = store.load_state()
    assert st.current is not None, "no active slot"
    for rec in (st.current, st.previous):
        if rec is None:
            continue
        path = store.model_path(rec.sha256)
        assert path.is_file(), f"slot points at a missing file {path.name}"
        assert sha256_file(path) == rec.sha256, "slot points at a file with other bytes"
        verify_installed(rec.envelope, trusted, model_line=LINE, sha256=rec.sha256)
        assert rec.sha256 in known
    for f in store.models_dir.glob("*.onnx"):  # no partial file is ever under models/
        assert sha256_file(f) == f.stem, f"partial or foreign file {f.name} in models/"
    return st


def agent_cmd(state_dir: Path, srv: FakeServer, key_pem: bytes, crash: str | None) -> dict:
    return {
        "cmd": "agent",
        "crash": crash,
        "truth_seed": TRUTH,
        "rate_hz": 80,
        "config": {
            "device_id": "crash-1",
            "model_line": LINE,
            "state_dir": str(state_dir),
            "trusted_keys": [key_pem.decode()],
            "server_url": srv.url,
            "bootstrap_token": FAKE_BOOTSTRAP_TOKEN,
            "mqtt_port": 9,  # no broker: targets arrive by the HTTP poll fallback
            "download_retries": 1,
            "download_chunk_bytes": 16 * 1024,
            "backoff_base_s": 0.02,
            "backoff_cap_s": 0.1,
            "connect_retry_s": 0.1,
            "target_poll_interval_s": 0.2,
            "update_retry_s": 0.2,
            "metrics_interval_s": 0.25,
            "upload_interval_s": 0.2,
            "probation_min_labelled": 40,
            "probation_max_s": 5.0,
            "probation_max_boots": 3,
            "min_free_memory_bytes": 0,
        },
    }


def named_point(rng: random.Random) -> str:
    point, hi = rng.choice(
        [
            ("state:notified", 1),
            ("state:downloading", 1),
            ("download:chunk", 40),
            ("state:verifying", 1),
            ("store:before_activate", 1),
            ("state:installing", 1),
            ("staging:persisted", 1),
            ("staging:swapped", 1),
            ("state:probation", 1),
            ("probation:tick", 12),
            ("store:before_replace", 6),
            ("state:committed", 1),
            ("state:rolled_back", 1),
            ("spool:appended", 20),
        ]
    )
    return f"{point}:{rng.randint(1, hi)}"


def test_sigkill_anywhere_never_bricks(tmp_path, signing_key) -> None:
    seed = int(os.environ.get("EDGELOOP_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
    print(f"\ncrash test seed: {seed} (replay with EDGELOOP_CRASH_SEED={seed})")
    rng = random.Random(seed)
    srv = FakeServer(throttle_bps=800_000).start()
    zygote = Zygote(tmp_path / "children.log")
    state_dir = tmp_path / "state"
    store = ModelStore(state_dir)
    trusted = load_trusted_keys([public_pem(signing_key)])
    key_pem = public_pem(signing_key)
    known: set[str] = set()
    kinds: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    kills = 0

    def publish(release: int, good: bool) -> tuple[dict, str]:
        data = make_big_model(TRUTH if good else 2 + release % 7, tag=f"r{release}")
        known.add(sha256(data))
        target = make_target(
            make_manifest(data, release=release, model_version=release),
            signing_key,
            srv.add(f"r{release}.onnx", data),
            rollout_id=release,
        )
        srv.target = target.to_json()
        return target.envelope, sha256(data)

    def settle(envelope: dict) -> Any:
        """Run one child without a crash point until the update for ``envelope`` settled."""
        nonlocal kills
        run = Run(zygote, agent_cmd(state_dir, srv, key_pem, None))
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                run.pump(0.1)
                job = store.load_state().update
                if job and job.target["envelope"] == envelope and job.state.value in SETTLED:
                    break
            else:
                raise AssertionError(f"update did not settle: {store.load_state().update}")
        finally:
            run.kill()
            kills += 1
            kinds["settled-then-killed"] += 1
        assert not run.of("predict_error"), run.of("predict_error")
        assert not run.of("child_error"), run.of("child_error")
        return check_disk(store, trusted, known)

    try:
        env, _ = publish(1, good=True)
        settle(env)
        release = 1
        while kills < KILLS:
            release += 1
            good = rng.random() < 0.7
            env, sha = publish(release, good)
            for _ in range(rng.randint(3, 10)):
                if rng.random() < 0.5:
                    crash = named_point(rng)
                    run = Run(zygote, agent_cmd(state_dir, srv, key_pem, crash))
                    if run.pump(1.0):
                        kinds[crash.rsplit(":", 1)[0]] += 1
                    else:  # that point lies behind this update already: kill from outside
                        run.kill()
                        kinds["named point not reached, killed at 1 s"] += 1
                else:
                    run = Run(zygote, agent_cmd(state_dir, srv, key_pem, None))
                    run.pump(rng.uniform(0.02, 0.8))
                    run.kill()
                    kinds["random delay"] += 1
                kills += 1
                assert run.exit is not None and run.exit["signal"] == signal.SIGKILL, run.exit
                assert not run.of("predict_error"), run.of("predict_error")
                assert not run.of("child_error"), run.of("child_error")
                for ev in run.of("serving"):  # every restart serves a verified model
                    assert ev["sha"] in known
                check_disk(store, trusted, known)
            st = settle(env)
            job = st.update
            assert job is not None
            outcomes[f"{'good' if good else 'bad'}:{job.state.value}"] += 1
            if job.state in (DeviceState.COMMITTED, DeviceState.ALREADY_INSTALLED):
                # ALREADY_INSTALLED: it committed earlier and the target was polled again.
                assert good, f"a worse model was committed: {job}"
                assert st.current is not None and st.current.sha256 == sha
            elif job.state == DeviceState.ROLLED_BACK:
                assert st.current is not None and st.current.sha256 != sha
                assert st.refuses(sha, release) is not None
            else:
                assert job.state == DeviceState.REFUSED
                assert st.refuses(sha, release) is not None, job.reason
    finally:
        zygote.close()
        srv.stop()
    print(f"kills: {kills} over {release - 1} updates; kill points: {dict(kinds)}")
    print(f"outcomes: {dict(outcomes)}")
    assert kills >= KILLS
    assert outcomes, "no update ran"


@pytest.mark.parametrize("batch_max", [7])
def test_spool_exactly_once_across_sigkill(
    tmp_path, fake_server: FakeServer, signing_key, batch_max
) -> None:
    """Samples acknowledged by ``Spool.add`` survive SIGKILL and are stored exactly once."""
    seed = int(os.environ.get("EDGELOOP_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
    print(f"\nspool crash seed: {seed}")
    rng = random.Random(seed)
    zygote = Zygote(tmp_path / "children.log")
    cmd = {
        "cmd": "spool",
        "dir": str(tmp_path / "spool"),
        "batch_max": batch_max,
        "config": {
            "device_id": "crash-1",
            "model_line": LINE,
            "state_dir": str(tmp_path),
            "server_url": fake_server.url,
            "bootstrap_token": FAKE_BOOTSTRAP_TOKEN,
            "upload_interval_s": 0.01,
            "upload_backoff_cap_s": 0.05,
        },
    }
    acked: list[str] = []
    try:
        for i in range(30):
            crash = (
                f"{rng.choice(['spool:appended', 'store:before_replace'])}:{rng.randint(1, 60)}"
                if i % 2
                else None
            )
            run = Run(zygote, {**cmd, "crash": crash})
            if not run.pump(rng.uniform(0.05, 0.4) if crash is None else 1.0):
                run.kill()
            acked += [e["id"] for e in run.of("acked")]
    finally:
        zygote.close()
    # Restart once more, in this process, with no new samples: drain what is left.
    spool = Spool(tmp_path / "spool", batch_max=batch_max, max_bytes=1 << 30)
    cfg = make_config(tmp_path, signing_key, server_url=fake_server.url)
    with device_http(fake_server, "crash-1") as client:  # the spool's device
        up = Uploader(cfg, spool=spool, client=client, stop=threading.Event())
        wait_until(lambda: up.upload_once() and spool.stats().pending == 0)
    lost = set(acked) - set(fake_server.acked_ids)
    sent_twice = len(fake_server.received_ids) - len(set(fake_server.received_ids))
    print(
        f"acked {len(acked)}, stored {len(set(fake_server.acked_ids))}, lost {len(lost)}, "
        f"resent by the transport {sent_twice}"
    )
    assert len(acked) > 100
    assert not lost, f"{len(lost)} acknowledged samples lost"
    assert len(fake_server.acked_ids) == len(set(fake_server.acked_ids))  # stored once each
