"""Model bytes by sha256, with HTTP Range (Starlette's FileResponse answers 206/416 itself)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server import crud
from server.api.deps import ServicesDep, SessionDep
from server.artifacts import check_sha256
from server.errors import NotFoundError

router = APIRouter(prefix="/api/v1/artifacts", tags=["artifacts"])


@router.get("/{sha256}", response_class=FileResponse)
def get_artifact(sha256: str, session: SessionDep, services: ServicesDep) -> FileResponse:
    check_sha256(sha256)
    if not crud.artifact_known(session, sha256=sha256) or not services.store.exists(sha256):
        raise NotFoundError(f"no artifact {sha256}")
    return FileResponse(
        services.store.path(sha256),
        media_type="application/octet-stream",
        headers={
            "Accept-Ranges": "bytes",
            "ETag": f'"{sha256}"',
            "Cache-Control": "public, max-age=31536000, immutable",
        },
    )
