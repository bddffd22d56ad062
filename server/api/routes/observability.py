"""Prometheus scrape endpoint and the per-version metric series behind the dashboard charts."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import ServicesDep, SessionDep, ViewerDep
from server.api.metrics import version_series
from server.api.schemas import Name
from server.db import registry

router = APIRouter(tags=["observability"])


@router.get("/metrics", response_class=Response, include_in_schema=False)
def prometheus(request: Request) -> Response:
    """Open like /healthz: Prometheus scrapes without a token; it exposes counts, no secrets."""
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/api/v1/model-lines/{name}/series")
def series(
    name: Name,
    _op: ViewerDep,
    session: SessionDep,
    services: ServicesDep,
    bucket_s: Annotated[int, Query(ge=1, le=86_400)] = 10,
    window_s: Annotated[int, Query(ge=1, le=30 * 86_400)] = 3600,
) -> list[dict[str, Any]]:
    """Live accuracy and latency per model version, bucketed by ``bucket_s`` seconds."""
    registry.get_model_line(session, name=name)  # 404 for an unknown line
    return version_series(session, line=name, bucket_s=bucket_s, since_ts=time.time() - window_s)
