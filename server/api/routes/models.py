"""Model lines, their versions (metrics, gate reports, artifacts, lineage), aliases and releases."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from server.api.deps import (
    IdPath,
    OperatorDep,
    ServicesDep,
    SessionDep,
    VersionPath,
    require_viewer,
)
from server.api.schemas import (
    Alias,
    AliasPublic,
    ArtifactInfo,
    LineConfigUpdate,
    ModelLineCreate,
    ModelLinePublic,
    ModelVersionDetail,
    ModelVersionPublic,
    Name,
    ReleasePublic,
)
from server.core.errors import InvalidRequestError, NotFoundError
from server.db import registry
from server.retrain.line_config import resolve_line_config
from server.retrain.lineage import DEFAULT_SAMPLE_LIMIT, model_lineage

# Reads need a viewer token (router-wide); changes need the operator role (per route).
router = APIRouter(
    prefix="/api/v1/model-lines", tags=["models"], dependencies=[Depends(require_viewer)]
)

SampleLimit = Annotated[int, Query(ge=0, le=10_000)]


@router.get("", response_model=list[ModelLinePublic])
def list_lines(session: SessionDep) -> Any:
    return registry.list_model_lines(session)


@router.post("", response_model=ModelLinePublic, status_code=201)
def create_line(
    body: ModelLineCreate, _op: OperatorDep, session: SessionDep, services: ServicesDep
) -> Any:
    config = resolve_line_config(
        services.settings,
        trainer=body.trainer,
        hyperparams=body.hyperparams,
        config=body.config,
        config_path=body.config_path,
    )
    line = registry.create_model_line(
        session,
        name=body.name,
        trainer=config.trainer,
        hyperparams=config.hyperparams,
        input_spec=body.input_spec,
        labels=body.labels,
        retrain_threshold=body.retrain_threshold
        or config.retrain_threshold
        or services.settings.retrain_threshold,
        initial_training=body.initial_training,
        now=services.clock(),
        training_config=config.to_dict(),
        schedule_s=config.schedule_s,
    )
    if body.initial_training:
        services.jobs.wake()
    return line


@router.get("/{name}", response_model=ModelLinePublic)
def get_line(name: Name, session: SessionDep) -> Any:
    return registry.get_model_line(session, name=name)


@router.put("/{name}/config", response_model=ModelLinePublic)
def put_config(
    name: Name,
    body: LineConfigUpdate,
    _op: OperatorDep,
    session: SessionDep,
    services: ServicesDep,
) -> Any:
    """Replace the line's training config; the next training uses it."""
    registry.get_model_line(session, name=name)
    if body.config is None and body.config_path is None:
        raise InvalidRequestError("give config or config_path")
    config = resolve_line_config(
        services.settings, config=body.config, config_path=body.config_path
    )
    return registry.update_line_config(
        session, line=name, config=config.to_dict(), retrain_threshold=config.retrain_threshold
    )


@router.get("/{name}/versions", response_model=list[ModelVersionPublic])
def list_versions(name: Name, session: SessionDep) -> Any:
    return registry.list_versions(session, line=name)


@router.get("/{name}/versions/{version}", response_model=ModelVersionDetail)
def get_version(name: Name, version: VersionPath, session: SessionDep) -> Any:
    return registry.get_version(session, line=name, version=version)


@router.get("/{name}/versions/{version}/report")
def get_report(name: Name, version: VersionPath, session: SessionDep) -> dict[str, Any]:
    """The training job's report: gate verdict with every check, metrics of challenger and
    champion (golden and field), parity, dataset, reproducibility."""
    report: dict[str, Any] = registry.get_version(session, line=name, version=version).report or {}
    return report


@router.get("/{name}/versions/{version}/artifacts", response_model=ArtifactInfo)
def get_artifacts(
    name: Name, version: VersionPath, session: SessionDep, services: ServicesDep
) -> Any:
    mv = registry.get_version(session, line=name, version=version)
    base = services.settings.artifact_url_base + "/"
    return {
        "line": mv.line,
        "version": mv.version,
        "model_sha256": mv.sha256,
        "model_size": mv.size,
        "model_url": base + mv.sha256 if mv.sha256 else None,
        "weights_sha256": mv.weights_sha256,
        "weights_url": base + mv.weights_sha256 if mv.weights_sha256 else None,
        "opset": (mv.report or {}).get("opset"),
        "dataset_version": mv.dataset_version,
    }


@router.get("/{name}/versions/{version}/lineage")
def get_lineage(
    name: Name,
    version: VersionPath,
    session: SessionDep,
    sample_limit: SampleLimit = DEFAULT_SAMPLE_LIMIT,
) -> dict[str, Any]:
    """Model version -> dataset version -> samples (first ``sample_limit``) -> devices."""
    return model_lineage(session, line=name, version=version, sample_limit=sample_limit)


@router.get("/{name}/aliases")
def list_aliases(name: Name, session: SessionDep) -> dict[str, int | None]:
    """Alias -> version number (None when nothing carries it)."""
    out: dict[str, int | None] = {}
    for alias in registry.ALIASES:
        try:
            out[alias] = registry.resolve_alias(session, line=name, alias=alias).version
        except NotFoundError:
            registry.get_model_line(session, name=name)  # an unknown line is still a 404
            out[alias] = None
    return out


@router.get("/{name}/aliases/{alias}", response_model=AliasPublic)
def get_alias(name: Name, alias: Alias, session: SessionDep) -> Any:
    mv = registry.resolve_alias(session, line=name, alias=alias)
    out = ModelVersionDetail.model_validate(mv).model_dump()
    out["alias"] = alias
    return out


@router.get("/{name}/releases/{release}", response_model=ReleasePublic)
def get_release(name: Name, release: IdPath, session: SessionDep) -> Any:
    return registry.get_release(session, line=name, release=release)
