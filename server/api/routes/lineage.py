"""Lineage read side: dataset versions, and what a device's samples went into."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from server.api.deps import SessionDep, require_viewer
from server.retrain.lineage import DEFAULT_SAMPLE_LIMIT, dataset_lineage, device_lineage

router = APIRouter(prefix="/api/v1", tags=["lineage"], dependencies=[Depends(require_viewer)])

SampleLimit = Annotated[int, Query(ge=0, le=10_000)]
Offset = Annotated[int, Query(ge=0, le=10**9)]


@router.get("/datasets/{version}")
def get_dataset(
    version: str,
    session: SessionDep,
    sample_limit: SampleLimit = DEFAULT_SAMPLE_LIMIT,
    offset: Offset = 0,
) -> dict[str, Any]:
    """A dataset version: its manifest, the models trained on it, its samples and devices."""
    return dataset_lineage(session, version=version, sample_limit=sample_limit, offset=offset)


@router.get("/devices/{device_id}/lineage")
def get_device_lineage(device_id: str, session: SessionDep) -> dict[str, Any]:
    """A device -> its samples -> the dataset versions and model versions they fed."""
    return device_lineage(session, device_id=device_id)
