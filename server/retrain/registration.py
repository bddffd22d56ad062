"""A finished training job becomes a model version: the retrain stage's last step.

The trainer's output directory (``model.onnx``, ``weights.npz``, ``dataset.json``, the report) is
stored and registered as a ``model_versions`` row, with its dataset version and the dataset's
sample links (lineage), in the transaction that marks the job succeeded or rejected. The line's
first passing version is its champion; later passing ones are candidates.

What follows a registration belongs to the next stages: signing the first champion's release
(``server.release``) and an automatic rollout of a candidate (``server.rollout``). The job runner
hands the :class:`RegisteredVersion` to a hook that the composition root wires
(``server.services``), in the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from server.core.errors import TrainingError
from server.db import registry
from server.db.registry import ModelLine, ModelVersion, TrainingJob
from server.release.artifacts import ArtifactStore
from server.retrain.lineage import store_dataset


@dataclass(frozen=True)
class TrainerOutputs:
    """What the trainer left, with its files already in the artifact store."""

    sha256: str | None  # model.onnx; None: the trainer wrote none (a rejected version)
    size: int | None  # bytes of model.onnx
    weights_sha256: str | None  # weights.npz (framework weights, for warm starts)
    manifest: Any  # dataset.json as read; None: the trainer wrote none


@dataclass(frozen=True)
class RegisteredVersion:
    """A version as registered, handed to the stages that follow."""

    line: str
    version: int
    status: str  # champion (the line's first passing version), candidate or rejected
    job_id: int
    registered_at: datetime

    @property
    def passed(self) -> bool:
        return self.status != "rejected"

    @property
    def first_champion(self) -> bool:
        return self.status == "champion"


def owned_by(job_id: int, runner: str) -> Any:
    """The SQL condition that ``runner`` still holds running job ``job_id``."""
    return (
        (TrainingJob.id == job_id)
        & (TrainingJob.status == "running")
        & (TrainingJob.claimed_by == runner)
    )


def store_outputs(store: ArtifactStore, output_dir: Path, *, passed: bool) -> TrainerOutputs:
    """Put the trainer's model and weights in the store and read its dataset manifest.

    Raises:
        TrainingError: a pass without model.onnx, or an unreadable dataset.json.
    """
    onnx_path = output_dir / "model.onnx"
    weights_path = output_dir / "weights.npz"
    sha: str | None = None
    size: int | None = None
    weights_sha: str | None = None
    if onnx_path.is_file():
        sha, size = store.put_file(onnx_path)
    elif passed:
        raise TrainingError("trainer reported a pass but wrote no model.onnx")
    if weights_path.is_file():
        weights_sha, _ = store.put_file(weights_path)
    manifest: Any = None
    if (output_dir / "dataset.json").is_file():
        try:
            manifest = json.loads((output_dir / "dataset.json").read_text())
        except (OSError, ValueError) as exc:
            raise TrainingError(f"trainer wrote an unreadable dataset.json: {exc}") from exc
    return TrainerOutputs(sha, size, weights_sha, manifest)


def register_version(
    session: Session,
    *,
    job: TrainingJob,
    runner: str,
    line: ModelLine,
    report: dict[str, Any],
    outputs: TrainerOutputs,
    now: datetime,
) -> RegisteredVersion | None:
    """Finish ``job`` and add its model version under the line's row lock; flushes only.

    Returns None, having written nothing, when ``runner`` no longer holds the job (another
    runner queued it again): the caller rolls back.
    """
    passed = report["passed"]
    metrics: dict[str, Any] = _as_dict(report.get("metrics"))
    dataset: dict[str, Any] = _as_dict(report.get("dataset"))
    gate_reason = str(report.get("reason", ""))[:2000]
    current = registry.lock_model_line(session, name=line.name)
    number = registry.next_version_number(session, line=line.name)
    # Claim the result first: if another runner re-queued the job, write nothing.
    owned = session.execute(
        update(TrainingJob)
        .where(owned_by(job.id, runner))
        .values(
            status="succeeded" if passed else "rejected",
            result_version=number,
            finished_at=now,
            error=None if passed else gate_reason,
            dataset_version=str(report.get("dataset_version") or "")[:64] or None,
        )
        .execution_options(synchronize_session=False)
    )
    if not owned.rowcount:  # type: ignore[attr-defined]
        return None
    dataset_version = str(report.get("dataset_version") or "")[:128] or None
    if outputs.manifest is not None:
        dataset_version = store_dataset(
            session, manifest=outputs.manifest, line=line.name, job_id=job.id, now=now
        )
    initial = current.champion_version is None
    status = ("champion" if initial else "candidate") if passed else "rejected"
    session.add(
        ModelVersion(
            line=line.name,
            version=number,
            status=status,
            sha256=outputs.sha256,
            size=outputs.size,
            parent_version=current.champion_version,
            dataset_version=dataset_version,
            trainer=str(report.get("trainer") or line.trainer)[:32],
            hyperparams=report.get("hyperparams") or line.hyperparams,
            metrics=metrics,
            report=report,
            sample_count=int(dataset.get("sample_count") or 0),
            job_id=job.id,
            reason=None if passed else gate_reason,
            created_at=now,
            weights_sha256=outputs.weights_sha256,
            alert_id=job.alert_id,  # lineage: the alert that queued the training, if any
        )
    )
    session.flush()
    return RegisteredVersion(line.name, number, status, job.id, now)


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
