"""Training jobs: list, inspect, trigger by hand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from server.api.deps import IdPath, OperatorDep, ServicesDep, SessionDep, require_viewer
from server.api.schemas import Name, TrainingJobCreate, TrainingJobPublic
from server.db import job_queue

router = APIRouter(
    prefix="/api/v1/training-jobs", tags=["training"], dependencies=[Depends(require_viewer)]
)


@router.post("", response_model=TrainingJobPublic, status_code=201)
def trigger(
    body: TrainingJobCreate, _op: OperatorDep, session: SessionDep, services: ServicesDep
) -> Any:
    job = job_queue.enqueue_job(
        session, line=body.model_line, trigger="manual", now=services.clock()
    )
    services.jobs.wake()
    return job


@router.get("", response_model=list[TrainingJobPublic])
def list_jobs(session: SessionDep, model_line: Name | None = None) -> Any:
    return job_queue.list_jobs(session, model_line=model_line)


@router.get("/{job_id}", response_model=TrainingJobPublic)
def get_job(job_id: IdPath, session: SessionDep) -> Any:
    return job_queue.get_job(session, job_id=job_id)
