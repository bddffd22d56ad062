"""Training job runner: claims queued jobs and runs the trainer as a subprocess.

Training never runs in the API process. For job ``N`` the runner writes ``data_dir/jobs/N/``:
``samples.npz`` (X float32 [n, F], y int64 [n], sample_ids, device_ids), ``spec.json``, and runs
``[training_python, "-m", "training", "--spec", spec.json]``. The trainer writes ``model.onnx``
and ``report.json`` into ``output_dir`` and exits 0 whether its gate passed or not; any other exit
(or no report) fails the job with the tail of stderr.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from contract import InputSpec
from server import crud
from server.artifacts import ArtifactStore
from server.background import Worker
from server.core.config import Settings
from server.db import ModelLine, ModelVersion, TrainingJob, utcnow
from server.errors import ConflictError, EdgeloopError, TrainingError
from server.rollout_queries import create_rollout
from server.signing import Signer, sign_release

log = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 4000  # characters of the trainer's stderr kept as the job error
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class JobRunner:
    """Runs one job at a time; ``run_once`` is what the thread calls (tests call it too)."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        signer: Signer,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.signer = signer
        self.clock = clock
        self._worker = Worker("job-runner", self._step, error_wait_s=settings.job_poll_s)

    def wake(self) -> None:
        self._worker.wake()

    def run_once(self) -> int | None:
        """Claim the oldest queued job and run it to the end. Returns its id, or None."""
        with self.sessions() as session:
            job = crud.claim_job(session, now=self.clock())
        if job is None:
            return None
        try:
            self._run(job)
        except EdgeloopError as exc:
            self._finish(job.id, status="failed", error=exc.message)
        except Exception as exc:  # the runner must survive any job; the error is recorded
            log.exception("training job %s crashed the runner", job.id)
            self._finish(job.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        return job.id

    def _finish(
        self, job_id: int, *, status: str, error: str | None = None, version: int | None = None
    ) -> None:
        with self.sessions() as session:
            session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id)
                .values(
                    status=status, error=error, result_version=version, finished_at=self.clock()
                )
                .execution_options(synchronize_session=False)
            )
            session.commit()

    def _prepare(self, job: TrainingJob, workdir: Path) -> tuple[Path, Path, ModelLine]:
        """Export samples and write spec.json; returns (spec path, output dir, line)."""
        with self.sessions() as session:
            line = crud.get_model_line(session, name=job.model_line)
            rows = crud.samples_of_line(session, line=line.name)
            champion: dict[str, Any] | None = None
            if line.champion_version is not None:
                cv = crud.get_version(session, line=line.name, version=line.champion_version)
                if cv.sha256 and self.store.exists(cv.sha256):
                    champion = {
                        "version": cv.version,
                        "onnx_path": str(self.store.path(cv.sha256).resolve()),
                    }
        features = InputSpec.from_dict(line.input_spec).features
        samples_path: Path | None = None
        if rows:
            samples_path = workdir / "samples.npz"
            X = np.frombuffer(b"".join(r.input for r in rows), dtype="<f4").reshape(-1, features)
            np.savez(
                samples_path,
                X=X.astype(np.float32),
                y=np.array([r.true_label for r in rows], dtype=np.int64),
                sample_ids=np.array([r.sample_id for r in rows], dtype=str),
                device_ids=np.array([r.device_id for r in rows], dtype=str),
            )
        with self.sessions() as session:
            session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job.id)
                .values(sample_count=len(rows))
                .execution_options(synchronize_session=False)
            )
            session.commit()
        output_dir = workdir / "output"
        output_dir.mkdir(exist_ok=True)
        spec = {
            "job_id": job.id,
            "model_line": line.name,
            "trainer": line.trainer,
            "hyperparams": line.hyperparams,
            "seed": job.id,
            "samples_path": str(samples_path.resolve()) if samples_path else None,
            "champion": champion,
            "gate": {
                "max_golden_drop": self.settings.train_max_golden_drop,
                "min_field_gain": self.settings.train_min_field_gain,
            },
            "input_spec": line.input_spec,
            "labels": line.labels,
            "output_dir": str(output_dir.resolve()),
        }
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
        log.info("training job %s: %s", job.id, " ".join(cmd))
        with open(workdir / "stdout.log", "wb") as out, open(workdir / "stderr.log", "wb") as err:
            try:
                proc = subprocess.run(
                    cmd,
                    stdout=out,
                    stderr=err,
                    cwd=workdir,
                    env=env,
                    timeout=self.settings.training_timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise TrainingError(
                    f"trainer ran past {self.settings.training_timeout_s:g} s and was killed"
                ) from exc
            except OSError as exc:
                raise TrainingError(f"cannot start trainer {cmd[0]!r}: {exc}") from exc
        stderr_tail = (
            (workdir / "stderr.log").read_bytes()[-STDERR_TAIL_CHARS:].decode("utf-8", "replace")
        )
        report_path = output_dir / "report.json"
        if proc.returncode != 0:
            raise TrainingError(f"trainer exited with {proc.returncode}: {stderr_tail}")
        try:
            report = json.loads(report_path.read_text())
            if not isinstance(report, dict) or not isinstance(report.get("passed"), bool):
                raise ValueError("report.json needs a boolean 'passed'")
        except (OSError, ValueError) as exc:
            raise TrainingError(f"trainer left no usable report.json: {exc}") from exc
        self._register(job, line, report, output_dir / "model.onnx")

    def _register(
        self, job: TrainingJob, line: ModelLine, report: dict[str, Any], onnx_path: Path
    ) -> None:
        passed = report["passed"]
        sha: str | None = None
        size: int | None = None
        if onnx_path.is_file():
            sha, size = self.store.put_file(onnx_path)
        elif passed:
            raise TrainingError("trainer reported a pass but wrote no model.onnx")
        now = self.clock()
        metrics: dict[str, Any] = _as_dict(report.get("metrics"))
        dataset: dict[str, Any] = _as_dict(report.get("dataset"))
        with self.sessions() as session:
            current = crud.lock_model_line(session, name=line.name)
            number = crud.next_version_number(session, line=line.name)
            initial = current.champion_version is None
            status = ("champion" if initial else "candidate") if passed else "rejected"
            session.add(
                ModelVersion(
                    line=line.name,
                    version=number,
                    status=status,
                    sha256=sha,
                    size=size,
                    parent_version=current.champion_version,
                    dataset_version=str(report.get("dataset_version") or "")[:128] or None,
                    trainer=str(report.get("trainer") or line.trainer)[:32],
                    hyperparams=report.get("hyperparams") or line.hyperparams,
                    metrics=metrics,
                    report=report,
                    sample_count=int(dataset.get("sample_count") or 0),
                    job_id=job.id,
                    reason=None if passed else str(report.get("reason", ""))[:2000],
                    created_at=now,
                )
            )
            session.flush()
            if passed and initial:
                release = sign_release(
                    session,
                    signer=self.signer,
                    line_name=line.name,
                    model_version=number,
                    now=now,
                    ttl_days=self.settings.manifest_ttl_days,
                )
                current.champion_version = number
                current.current_release = release.release
            elif passed and self.settings.auto_rollout:
                try:
                    with session.begin_nested():
                        create_rollout(
                            session,
                            line=line.name,
                            to_version=number,
                            canary_percent=self.settings.canary_percent,
                            created_by=f"auto (job {job.id})",
                            now=now,
                        )
                except ConflictError as exc:
                    log.warning("no automatic rollout for %s v%s: %s", line.name, number, exc)
            session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job.id)
                .values(
                    status="succeeded" if passed else "rejected",
                    result_version=number,
                    finished_at=now,
                    error=None if passed else str(report.get("reason", ""))[:2000],
                )
                .execution_options(synchronize_session=False)
            )
            session.commit()
        log.info("training job %s: version %s %s", job.id, number, status)

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop(timeout=30)

    def _step(self) -> float:
        ran = self.run_once()
        return 0.0 if ran is not None else self.settings.job_poll_s


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
