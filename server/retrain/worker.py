"""Training worker: claims a job from the database, trains it, hands the results back.

A worker runs anywhere that reaches the database and the artifact store (``edgeloop worker`` on a
GPU machine, or a thread of a development server). It claims the oldest due queued job with one
guarded ``UPDATE ... RETURNING`` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), taking an attempt and
a lease in its name (``host:pid:nonce``). For attempt ``k`` of job ``N`` it builds the job's
dataset from the shared database into ``jobs_dir/N/`` (``samples.npz``, the format is
:mod:`training.samples`'s, on both sides; the champion it warm-starts from is fetched from the
store) and runs ``[training_python, "-m", "training", "--spec", spec.json]`` with output in
``attempt-k/``, heartbeating the lease while it runs.

The worker builds the dataset itself, from the database, rather than a server preparing it into
the store: it holds the job's lease while it reads the samples, so the dataset is the one of the
attempt that trains on it, with no second state ("prepared") and no second writer, and no export
per job is left in the store.

The result leaves the worker as files in the artifact store (:mod:`server.retrain.handback`): the
worker stores them, then records their shas on the job and sets it ``trained``, in one guarded
update whose transaction also wakes the servers' registrars (PostgreSQL ``NOTIFY``). It never
registers, signs or rolls out: a server does (:mod:`server.retrain.registrar`), since the signing
key lives with the servers.

Failure handling:

- the trainer exits 2 (invalid spec): the job fails at once, retrying cannot help;
- any other exit, a signal (SIGKILL, OOM), a timeout, no usable report or a hand-back the store
  refuses: the job is queued again with a backoff, until ``training_max_attempts``;
- the worker dies mid-training: the lease expires (or its pid is gone on this host) and any
  worker or server queues the job again (:func:`server.db.job_queue.recover_stale_jobs`); the
  trainer subprocess notices its parent died and exits;
- a worker that lost its lease (the job was queued again) stops its trainer and records nothing
  on the job: every write is guarded by ``status = 'running' AND claimed_by = me``. What it would
  have said (a result it finished anyway: :class:`JobLostError`) is refused and written to the
  audit log against the job (``training.result_refused``, subject ``job:N``), since the job row
  belongs to its new holder.
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
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from contract import InputSpec
from server.core.background import Worker
from server.core.config import Settings
from server.core.errors import EdgeloopError, TrainingError
from server.db import audit, job_queue, registry, sample_store
from server.db.base import utcnow
from server.db.registry import ModelLine, TrainingJob
from server.release.artifacts import ArtifactStore
from server.retrain.handback import HandedBack, fetch, hand_back
from training.samples import Samples, write_samples

log = logging.getLogger(__name__)
T = TypeVar("T")

STDERR_TAIL_CHARS = 4000  # characters of the trainer's stderr kept as the job error
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPEC_EXIT_CODE = 2  # `python -m training` exit status for an invalid spec (never retried)
POLL_S = 0.2  # seconds between checks of the running trainer


class PermanentJobError(TrainingError):
    """The job cannot succeed by retrying (an invalid spec, a line that cannot be trained)."""


class JobLostError(TrainingError):
    """The worker no longer holds the job (it was queued again): its result is refused."""


class LeaseLost(Exception):
    """Internal: another runner re-queued this job; stop and write nothing."""


class ShuttingDown(TrainingError):
    """Internal: the worker is stopping; the job goes back to the queue at once."""


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


def owned_by(job_id: int, runner: str) -> Any:
    """The SQL condition that ``runner`` still holds running job ``job_id``."""
    return (
        (TrainingJob.id == job_id)
        & (TrainingJob.status == "running")
        & (TrainingJob.claimed_by == runner)
    )


def recover(
    sessions: sessionmaker[Session], settings: Settings, now: datetime
) -> tuple[list[int], list[int]]:
    """Re-queue (or fail) jobs whose runner died; returns (requeued, failed) ids."""
    with sessions() as session:
        requeued, failed = job_queue.recover_stale_jobs(
            session, now=now, lease_s=settings.job_lease_s, is_dead=runner_is_dead
        )
    if requeued or failed:
        log.warning("training jobs of dead runners: requeued %s, failed %s", requeued, failed)
    return requeued, failed


def export_base_pool(base: str, features: int, dest: Path) -> Path | None:
    """The line's base training pool as ``samples.npz`` (for label screening on the servers);
    None for a base the servers do not screen against (only ``digits`` with 64 features)."""
    if base != "digits" or features != 64:
        return None
    from training.data import digits_pools  # the training extra: only where a worker runs

    pool = digits_pools().train
    n = len(pool.y)
    return write_samples(
        dest,
        Samples(
            X=pool.X,
            y=pool.y,
            sample_ids=np.array([f"base-{i}" for i in range(n)], dtype=str),
            device_ids=np.array(["base"] * n, dtype=str),
        ),
    )


class TrainingWorker:
    """Trains one job at a time; ``run_once`` is what the loop calls (tests call it too).

    Args:
        on_trained: called with the job id once it is ``trained`` (a development server wakes
            its registrar).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        clock: Callable[[], datetime] = utcnow,
        on_trained: Callable[[int], None] = lambda _job_id: None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.clock = clock
        self.on_trained = on_trained
        self.identity = runner_identity()
        self._stopping = threading.Event()
        self._worker = Worker("training-worker", self._step, error_wait_s=settings.job_poll_s)

    def wake(self) -> None:
        self._worker.wake()

    def recover(self) -> tuple[list[int], list[int]]:
        return recover(self.sessions, self.settings, self.clock())

    def run_once(self) -> int | None:
        """Recover dead runners' jobs, then claim the oldest due job and train it to the end
        (``trained``, queued again or failed). Returns its id, or None when nothing was due."""
        self.recover()
        with self.sessions() as session:
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
            self._refused(job, "lease lost (the job was queued again): training abandoned")
        except JobLostError as exc:
            self._refused(job, exc.message)
        except ShuttingDown as exc:
            self._fail(job, exc.message, permanent=False, backoff=False)
        except PermanentJobError as exc:
            self._fail(job, exc.message, permanent=True)
        except EdgeloopError as exc:
            self._fail(job, exc.message, permanent=False)
        except Exception as exc:  # the worker must survive any job; the error is recorded
            log.exception("training job %s crashed the worker", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}", permanent=False)
        return job.id

    # ------------------------------------------------------------ state changes (guarded)

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
            res = session.execute(
                update(TrainingJob)
                .where(owned_by(job.id, self.identity))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        if not res.rowcount:  # type: ignore[attr-defined]
            self._refused(job, f"its failure ({error}) came after the job was queued again")
            return
        log.warning(
            "training job %s attempt %s %s: %s",
            job.id,
            job.attempts,
            "will retry" if retry else "failed",
            error[:500],
        )

    def _refused(self, job: TrainingJob, why: str) -> None:
        """Record that this worker's word on ``job`` came too late (it no longer holds it)."""
        message = f"worker {self.identity}, attempt {job.attempts}: {why}"
        log.warning("training job %s: %s", job.id, message)
        with self.sessions() as session:
            audit.record(
                session,
                actor=f"worker:{self.identity}"[:128],
                action="training.result_refused",
                subject=f"job:{job.id}",
                details={"attempt": job.attempts, "reason": why[:2000]},
                now=self.clock(),
            )
            session.commit()

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

    def _prepare(self, job: TrainingJob, workdir: Path) -> tuple[Path, Path, dict[str, Any]]:
        """Build the dataset from the database, fetch the champion, write spec.json; returns
        (spec path, output dir, spec)."""
        with self.sessions() as session:
            line = registry.get_model_line(session, name=job.model_line)
            rows = sample_store.samples_of_line(session, line=line.name)
            champion_row = None
            if line.champion_version is not None:
                champion_row = registry.get_version(
                    session, line=line.name, version=line.champion_version
                )
            session.expunge_all()
        champion: dict[str, Any] | None = None
        if champion_row is not None and champion_row.sha256:
            onnx_path = fetch(self.store, champion_row.sha256, workdir / "champion.onnx")
            if onnx_path is not None:
                champion = {"version": champion_row.version, "onnx_path": str(onnx_path)}
                if champion_row.weights_sha256:
                    weights = fetch(
                        self.store, champion_row.weights_sha256, workdir / "champion-weights.npz"
                    )
                    if weights is not None:
                        champion["weights_path"] = str(weights)
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
            res = session.execute(
                update(TrainingJob)
                .where(owned_by(job.id, self.identity))
                .values(sample_count=len(rows), heartbeat_at=self.clock())
                .execution_options(synchronize_session=False)
            )
            session.commit()
        if not res.rowcount:  # type: ignore[attr-defined]
            raise LeaseLost()
        output_dir = workdir / f"attempt-{job.attempts}"
        output_dir.mkdir(exist_ok=True)
        spec = self._spec(job, line, champion)
        spec["samples_path"] = str(samples_path.resolve()) if samples_path else None
        spec["output_dir"] = str(output_dir.resolve())
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        return spec_path, output_dir, {**spec, "features": features}

    def _run(self, job: TrainingJob) -> None:
        workdir = (self.settings.jobs_dir / str(job.id)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path, output_dir, spec = self._prepare(job, workdir)
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
        if report["passed"] and not (output_dir / "model.onnx").is_file():
            raise TrainingError("trainer reported a pass but wrote no model.onnx")
        base = self._heartbeating(
            job,
            lambda: export_base_pool(
                str(spec["base"]), int(spec["features"]), workdir / "base.npz"
            ),
        )
        self._heartbeat(job.id)  # still ours before the store is written to
        result = self._heartbeating(job, lambda: hand_back(self.store, output_dir, base_pool=base))
        self._record(job, result)

    def _heartbeating(self, job: TrainingJob, work: Callable[[], T]) -> T:
        """Run ``work`` (loading the base data, uploading to the store) in a thread while this
        one keeps the lease alive; re-raises what it raised."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"job-{job.id}-handback", daemon=True)
        thread.start()
        while True:
            thread.join(self.settings.job_heartbeat_s)
            if not thread.is_alive():
                break
            self._heartbeat(job.id)
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def _record(self, job: TrainingJob, result: HandedBack) -> None:
        """running -> trained, with the results' shas, if this worker still holds the job."""
        with self.sessions() as session:
            res = session.execute(
                update(TrainingJob)
                .where(owned_by(job.id, self.identity))
                .values(
                    status="trained",
                    trained_at=self.clock(),
                    error=None,
                    result_sha256=result.model_sha256,
                    result_size=result.model_size,
                    result_weights_sha256=result.weights_sha256,
                    result_report_sha256=result.report_sha256,
                    result_dataset_sha256=result.dataset_sha256,
                    result_base_sha256=result.base_sha256,
                )
                .execution_options(synchronize_session=False)
            )
            if res.rowcount:  # type: ignore[attr-defined]
                job_queue.announce_trained(session, job_id=job.id)  # delivered on commit
            session.commit()
        if not res.rowcount:  # type: ignore[attr-defined]
            raise JobLostError(
                f"result (model {result.model_sha256}, report {result.report_sha256}) refused: "
                "the job is no longer held by this worker (it was queued again)"
            )
        log.info("training job %s attempt %s: trained", job.id, job.attempts)
        self.on_trained(job.id)

    def _wait(self, job: TrainingJob, proc: subprocess.Popen[bytes]) -> int:
        """Wait for the trainer, heartbeating; kill it on timeout or a lost lease."""
        started = time.monotonic()
        next_beat = started + self.settings.job_heartbeat_s
        while True:
            code = proc.poll()
            if code is not None:
                return code
            if self._stopping.is_set():
                raise ShuttingDown("the worker stopped while the trainer ran")
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

    # ------------------------------------------------------------ loop

    def start(self) -> None:
        self._stopping.clear()
        self._worker.start()

    def stop(self) -> None:
        self._stopping.set()  # a running trainer is stopped and its job queued again
        self._worker.stop(timeout=30)

    def request_stop(self) -> None:
        """Ask a blocking :meth:`serve` to end (a signal handler calls this)."""
        self._stopping.set()
        self._worker.wake()

    def serve(self, *, max_jobs: int | None = None) -> int:
        """Train jobs in this thread until :meth:`request_stop` (or ``max_jobs`` ran); returns
        the number of jobs run. A step that raises (the database is down) is logged and
        retried after ``job_poll_s``."""
        ran = 0
        self._stopping.clear()
        while not self._stopping.is_set() and (max_jobs is None or ran < max_jobs):
            try:
                job_id = self.run_once()
            except Exception:  # a database blip must not end the worker
                log.exception("training worker: step failed")
                job_id = None
            if job_id is not None:
                ran += 1
                continue
            self._stopping.wait(self.settings.job_poll_s)
        return ran

    def _step(self) -> float:
        ran = self.run_once()
        return 0.0 if ran is not None else self.settings.job_poll_s


__all__ = [
    "JobLostError",
    "PermanentJobError",
    "TrainingWorker",
    "export_base_pool",
    "owned_by",
    "recover",
    "runner_identity",
    "runner_is_dead",
]
