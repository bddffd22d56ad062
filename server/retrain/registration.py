"""A trained job becomes a model version: the retrain stage's last step, on a server.

What a worker handed back (``model.onnx``, ``weights.npz`` and the base pool in the artifact
store, the report and the dataset manifest read from it: :class:`TrainerOutputs`) is registered as
a ``model_versions`` row, with its dataset version and the dataset's sample links (lineage), in the
transaction that moves the job from ``trained`` to succeeded or rejected. The line's first passing
version is its champion; later passing ones are candidates.

What follows a registration belongs to the next stages: signing the first champion's release
(``server.release``) and an automatic rollout of a candidate (``server.rollout``). The registrar
hands the :class:`RegisteredVersion` to a hook that the composition root wires
(``server.services``), in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from server.db import registry
from server.db.registry import ModelLine, ModelVersion, TrainingJob
from server.retrain.lineage import store_dataset


@dataclass(frozen=True)
class TrainerOutputs:
    """What the trainer left, with its files already in the artifact store."""

    sha256: str | None  # model.onnx; None: the trainer wrote none (a rejected version)
    size: int | None  # bytes of model.onnx
    weights_sha256: str | None  # weights.npz (framework weights, for warm starts)
    manifest: Any  # dataset.json as read; None: the trainer wrote none
    base_pool_sha256: str | None = None  # the line's base pool (label screening's neighbours)


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


def trained(job_id: int) -> Any:
    """The SQL condition that job ``job_id`` is trained and not yet registered."""
    return (TrainingJob.id == job_id) & (TrainingJob.status == "trained")


def register_version(
    session: Session,
    *,
    job: TrainingJob,
    line: ModelLine,
    report: dict[str, Any],
    outputs: TrainerOutputs,
    now: datetime,
) -> RegisteredVersion | None:
    """Finish trained ``job`` and add its model version under the line's row lock; flushes
    only.

    Returns None, having written nothing, when the job is no longer ``trained`` (another server
    registered it first): the caller rolls back.
    """
    passed = report["passed"]
    metrics: dict[str, Any] = _as_dict(report.get("metrics"))
    dataset: dict[str, Any] = _as_dict(report.get("dataset"))
    gate_reason = str(report.get("reason", ""))[:2000]
    current = registry.lock_model_line(session, name=line.name)
    number = registry.next_version_number(session, line=line.name)
    # Claim the result first: if another server registered it, write nothing.
    owned = session.execute(
        update(TrainingJob)
        .where(trained(job.id))
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
    if outputs.base_pool_sha256 is not None:
        current.base_pool_sha256 = outputs.base_pool_sha256
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
