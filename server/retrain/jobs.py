"""Training job runner: a durable queue in the database, the trainer in a subprocess.

Training never runs in the API process. The runner claims the oldest due queued job with one
guarded ``UPDATE ... RETURNING`` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), taking an attempt and
a lease in its name (``host:pid:nonce``). For attempt ``k`` of job ``N`` it writes
``data_dir/jobs/N/``: ``samples.npz`` (the format is :mod:`training.samples`'s, on both sides)
and ``spec.json``, then runs ``[training_python, "-m", "training", "--spec", spec.json]`` with
output in ``attempt-k/``, heartbeating the lease while it runs.

Failure handling:

- the trainer exits 2 (invalid spec): the job fails at once, retrying cannot help;
- any other exit, a signal (SIGKILL, OOM), a timeout or no usable report: the job is queued again
  with a backoff, until ``training_max_attempts``;
- the server dies mid-training: the lease expires (or the runner's pid is gone on this host) and
  any runner queues the job again (:func:`server.db.job_queue.recover_stale_jobs`); the trainer
  subprocess notices its parent died and exits;
- a runner that lost its lease (another runner re-queued the job) stops its trainer and writes
  nothing: every write is guarded by ``status = 'running' AND claimed_by = me``.

The result (``model.onnx``, ``weights.npz``, ``dataset.json``, ``report.json``) becomes a model
version with its gate report, its dataset version and the dataset's sample links (lineage), see
``server.retrain.registration``; the next stages' steps (sign the first champion's release, start
an automatic rollout) run in the ``on_registered`` hook the composition root gives the runner.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from contract import InputSpec
from server.core.background import Worker
from server.core.config import Settings
from server.core.errors import EdgeloopError, TrainingError
from server.db import job_queue, registry, sample_store
from server.db.base import utcnow
from server.db.registry import ModelLine, TrainingJob
from server.release.artifacts import ArtifactStore
from server.retrain.registration import (
    RegisteredVersion,
    owned_by,
    register_version,
    store_outputs,
)
from server.retrain.scheduler import enqueue_due
from training.samples import Samples, write_samples

log = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 4000  # characters of the trainer's stderr kept as the job error
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPEC_EXIT_CODE = 2  # `python -m training` exit status for an invalid spec (never retried)
POLL_S = 0.2  # seconds between checks of the running trainer


class PermanentJobError(TrainingError):
    """The job cannot succeed by retrying (an invalid spec, a line that cannot be trained)."""


class LeaseLost(Exception):
    """Internal: another runner re-queued this job; stop and write nothing."""


class ShuttingDown(TrainingError):
    """Internal: the server is stopping; the job goes back to the queue at once."""


def runner_identity() -> str:
    """``host:pid:nonce``: unique per runner, and tells a same-host runner whether we live."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def runner_is_dead(claimed_by: str) -> bool:
    """True when ``claimed_by`` names a runner on this host whose process no longer exists."""
    host, _, rest = claimed_by.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname()[:64] or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobRunner:
    """Runs one job at a time; ``run_once`` is what the thread calls (tests call it too)."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        on_registered: Callable[[Session, RegisteredVersion], None],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        # What follows a registration (release, rollout), in its transaction: see services.
        self.on_registered = on_registered
        self.clock = clock
        self.identity = runner_identity()
        self._stopping = threading.Event()
        self._worker = Worker("job-runner", self._step, error_wait_s=settings.job_poll_s)

    def wake(self) -> None:
        self._worker.wake()

    def recover(self) -> tuple[list[int], list[int]]:
        """Re-queue (or fail) jobs whose runner died; returns (requeued, failed) ids."""
        with self.sessions() as session:
            requeued, failed = job_queue.recover_stale_jobs(
                session,
                now=self.clock(),
                lease_s=self.settings.job_lease_s,
                is_dead=runner_is_dead,
            )
        if requeued or failed:
            log.warning("training jobs of dead runners: requeued %s, failed %s", requeued, failed)
        return requeued, failed

    def run_once(self) -> int | None:
        """Recover dead runners' jobs, queue scheduled ones, then claim the oldest due job and
        run it to the end. Returns its id, or None when nothing was due."""
        self.recover()
        with self.sessions() as session:
            enqueue_due(session, now=self.clock())
            job = job_queue.claim_job(
                session,
                now=self.clock(),
                runner=self.identity,
                max_attempts=self.settings.training_max_attempts,
            )
        if job is None:
            return None
        try:
            self._run(job)
        except LeaseLost:
            log.warning("training job %s: lease lost to another runner; abandoned", job.id)
        except ShuttingDown as exc:
            self._fail(job, exc.message, permanent=False, backoff=False)
        except PermanentJobError as exc:
            self._fail(job, exc.message, permanent=True)
        except EdgeloopError as exc:
            self._fail(job, exc.message, permanent=False)
        except Exception as exc:  # the runner must survive any job; the error is recorded
            log.exception("training job %s crashed the runner", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}", permanent=False)
        return job.id

    # ------------------------------------------------------------ state changes (guarded)

    def _mine(self, job_id: int) -> Any:
        return owned_by(job_id, self.identity)

    def _fail(self, job: TrainingJob, error: str, *, permanent: bool, backoff: bool = True) -> None:
        """Queue the job again with a backoff, or fail it (permanent, or out of attempts)."""
        now = self.clock()
        retry = not permanent and job.attempts < self.settings.training_max_attempts
        if not backoff:  # a shutdown is not the job's fault: always back to the queue
            retry = True
        message = f"attempt {job.attempts}: {error}"
        if retry:
            wait_s = self.settings.training_retry_backoff_s * 2 ** (job.attempts - 1)
            values: dict[str, Any] = {
                "status": "queued",
                "claimed_by": None,
                "not_before": now + timedelta(seconds=wait_s if backoff else 0),
                "error": f"{message} (will retry)"[:8000],
            }
        else:
            values = {"status": "failed", "finished_at": now, "error": message[:8000]}
        with self.sessions() as session:
            session.execute(
                update(TrainingJob)
                .where(self._mine(job.id))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        log.warning(
            "training job %s attempt %s %s: %s",
            job.id,
            job.attempts,
            "will retry" if retry else "failed",
            error[:500],
        )

    def _heartbeat(self, job_id: int) -> None:
        with self.sessions() as session:
            if not job_queue.heartbeat_job(
                session, job_id=job_id, runner=self.identity, now=self.clock()
            ):
                raise LeaseLost()

    # ------------------------------------------------------------ one attempt

    def _spec(self, job: TrainingJob, line: ModelLine, champion: dict[str, Any] | None) -> dict:
        config = dict(line.training_config or {})
        gate = dict(config.get("gate") or {})
        gate.setdefault("max_golden_drop", self.settings.train_max_golden_drop)
        gate.setdefault("min_field_gain", self.settings.train_min_field_gain)
        spec: dict[str, Any] = {
            "job_id": job.id,
            "model_line": line.name,
            "trainer": line.trainer,
            "hyperparams": line.hyperparams,
            "seed": int(config.get("seed", 0)),
            "champion": champion,
            "gate": gate,
            "input_spec": line.input_spec,
            "labels": line.labels,
            "base": config.get("base", "digits"),
            "warm_start": bool(config.get("warm_start", False)),
        }
        if "field_fraction" in config:
            spec["field_fraction"] = config["field_fraction"]
        return spec

    def _prepare(self, job: TrainingJob, workdir: Path) -> tuple[Path, Path, ModelLine]:
        """Export samples and write spec.json; returns (spec path, output dir, line)."""
        with self.sessions() as session:
            line = registry.get_model_line(session, name=job.model_line)
            rows = sample_store.samples_of_line(session, line=line.name)
            champion: dict[str, Any] | None = None
            if line.champion_version is not None:
                cv = registry.get_version(session, line=line.name, version=line.champion_version)
                if cv.sha256 and self.store.exists(cv.sha256):
                    champion = {
                        "version": cv.version,
                        "onnx_path": str(self.store.local_path(cv.sha256).resolve()),
                    }
                    if cv.weights_sha256 and self.store.exists(cv.weights_sha256):
                        weights = self.store.local_path(cv.weights_sha256)
                        champion["weights_path"] = str(weights.resolve())
        features = InputSpec.from_dict(line.input_spec).features
        samples_path: Path | None = None
        if rows:
            samples_path = write_samples(
                workdir / "samples.npz",
                Samples(
                    X=np.frombuffer(b"".join(r.input for r in rows), dtype="<f4").reshape(
                        -1, features
                    ),
                    y=np.array([r.true_label for r in rows], dtype=np.int64),
                    sample_ids=np.array([r.sample_id for r in rows], dtype=str),
                    device_ids=np.array([r.device_id for r in rows], dtype=str),
                    label_sources=np.array(
                        [sample_store.provenance(r.origin, r.label_source) for r in rows], dtype=str
                    ),
                ),
            )
        with self.sessions() as session:
            session.execute(
                update(TrainingJob)
                .where(self._mine(job.id))
                .values(sample_count=len(rows), heartbeat_at=self.clock())
                .execution_options(synchronize_session=False)
            )
            session.commit()
        output_dir = workdir / f"attempt-{job.attempts}"
        output_dir.mkdir(exist_ok=True)
        spec = self._spec(job, line, champion)
        spec["samples_path"] = str(samples_path.resolve()) if samples_path else None
        spec["output_dir"] = str(output_dir.resolve())
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        return spec_path, output_dir, line

    def _run(self, job: TrainingJob) -> None:
        workdir = (self.settings.jobs_dir / str(job.id)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path, output_dir, line = self._prepare(job, workdir)
        cmd = [self.settings.training_python, "-m", "training", "--spec", str(spec_path)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["EDGELOOP_TRAINER_PARENT_PID"] = str(os.getpid())  # the trainer exits if we die
        env["EDGELOOP_TRAINER_NICE"] = str(self.settings.training_nice)  # serving comes first
        log.info("training job %s attempt %s: %s", job.id, job.attempts, " ".join(cmd))
        suffix = f"-{job.attempts}.log"
        with (
            open(workdir / f"stdout{suffix}", "wb") as out,
            open(workdir / f"stderr{suffix}", "wb") as err,
        ):
            try:
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=workdir, env=env)
            except OSError as exc:
                raise TrainingError(f"cannot start trainer {cmd[0]!r}: {exc}") from exc
            try:
                returncode = self._wait(job, proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stderr_tail = (
            (workdir / f"stderr{suffix}")
            .read_bytes()[-STDERR_TAIL_CHARS:]
            .decode("utf-8", "replace")
        )
        if returncode == SPEC_EXIT_CODE:
            raise PermanentJobError(f"trainer refused the spec: {stderr_tail}")
        if returncode < 0:
            raise TrainingError(f"trainer was killed by signal {-returncode}: {stderr_tail}")
        if returncode != 0:
            raise TrainingError(f"trainer exited with {returncode}: {stderr_tail}")
        try:
            report = json.loads((output_dir / "report.json").read_text())
            if not isinstance(report, dict) or not isinstance(report.get("passed"), bool):
                raise ValueError("report.json needs a boolean 'passed'")
        except (OSError, ValueError) as exc:
            raise TrainingError(f"trainer left no usable report.json: {exc}") from exc
        self._register(job, line, report, output_dir)

    def _wait(self, job: TrainingJob, proc: subprocess.Popen[bytes]) -> int:
        """Wait for the trainer, heartbeating; kill it on timeout or a lost lease."""
        started = time.monotonic()
        next_beat = started + self.settings.job_heartbeat_s
        while True:
            code = proc.poll()
            if code is not None:
                return code
            if self._stopping.is_set():
                raise ShuttingDown("the server stopped while the trainer ran")
            now = time.monotonic()
            if now - started > self.settings.training_timeout_s:
                proc.kill()
                proc.wait()
                raise TrainingError(
                    f"trainer ran past {self.settings.training_timeout_s:g} s and was killed"
                )
            if now >= next_beat:
                self._heartbeat(job.id)
                next_beat = now + self.settings.job_heartbeat_s
            time.sleep(POLL_S)

    def _register(
        self, job: TrainingJob, line: ModelLine, report: dict[str, Any], output_dir: Path
    ) -> None:
        """Register the version, then hand it to the next stages (``on_registered``), in one
        transaction."""
        outputs = store_outputs(self.store, output_dir, passed=report["passed"])
        now = self.clock()
        with self.sessions() as session:
            version = register_version(
                session,
                job=job,
                runner=self.identity,
                line=line,
                report=report,
                outputs=outputs,
                now=now,
            )
            if version is None:
                session.rollback()
                raise LeaseLost()
            self.on_registered(session, version)
            session.commit()
        log.info("training job %s: version %s %s", job.id, version.version, version.status)

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._stopping.clear()
        self._worker.start()

    def stop(self) -> None:
        self._stopping.set()  # a running trainer is stopped and its job queued again
        self._worker.stop(timeout=30)

    def _step(self) -> float:
        ran = self.run_once()
        return 0.0 if ran is not None else self.settings.job_poll_s
