"""Model lines, their versions (with lineage) and signed releases."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server import crud
from server.api.deps import IdPath, ServicesDep, SessionDep, VersionPath
from server.schemas import (
    ModelLineCreate,
    ModelLinePublic,
    ModelVersionDetail,
    ModelVersionPublic,
    Name,
    ReleasePublic,
)

router = APIRouter(prefix="/api/v1/model-lines", tags=["models"])


@router.get("", response_model=list[ModelLinePublic])
def list_lines(session: SessionDep) -> Any:
    return crud.list_model_lines(session)


@router.post("", response_model=ModelLinePublic, status_code=201)
def create_line(body: ModelLineCreate, session: SessionDep, services: ServicesDep) -> Any:
    line = crud.create_model_line(
        session,
        name=body.name,
        trainer=body.trainer,
        hyperparams=body.hyperparams,
        input_spec=body.input_spec,
        labels=body.labels,
        retrain_threshold=body.retrain_threshold or services.settings.retrain_threshold,
        initial_training=body.initial_training,
        now=services.clock(),
    )
    if body.initial_training:
        services.jobs.wake()
    return line


@router.get("/{name}", response_model=ModelLinePublic)
def get_line(name: Name, session: SessionDep) -> Any:
    return crud.get_model_line(session, name=name)


@router.get("/{name}/versions", response_model=list[ModelVersionPublic])
def list_versions(name: Name, session: SessionDep) -> Any:
    return crud.list_versions(session, line=name)


@router.get("/{name}/versions/{version}", response_model=ModelVersionDetail)
def get_version(name: Name, version: VersionPath, session: SessionDep) -> Any:
    return crud.get_version(session, line=name, version=version)


@router.get("/{name}/releases/{release}", response_model=ReleasePublic)
def get_release(name: Name, release: IdPath, session: SessionDep) -> Any:
    return crud.get_release(session, line=name, release=release)
