"""Model bytes by sha256, with HTTP Range.

Artifacts are content-addressed and immutable, so a model is read from disk once and served from
memory to every device that downloads it (``ArtifactCache``, bounded): a fleet downloading one
release costs one event-loop response per request, not a thread-pool hop, a database query and a
file open each (measured: about 50 downloads/s on 2 cores with 1,000 devices downloading at
once, the rollout's bottleneck). Artifacts too large for the cache are streamed from disk.

Range: one ``bytes=a-b`` / ``a-`` / ``-n`` range is answered 206 with Content-Range; an
unsatisfiable one 416 with ``Content-Range: bytes */size``; several ranges, or an ``If-Range``
that is not our ETag, get the whole body (200), which RFC 9110 allows.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from server.api.deps import ServicesDep
from server.core.errors import NotFoundError
from server.db import registry
from server.release.artifacts import check_sha256
from server.services import Services

router = APIRouter(prefix="/api/v1/artifacts", tags=["artifacts"])

CACHE_MAX_ARTIFACT_BYTES = 32 * 1024 * 1024  # bytes; larger artifacts are streamed from disk
CACHE_MAX_TOTAL_BYTES = 256 * 1024 * 1024  # bytes held by one server process
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class ArtifactCache:
    """sha256 -> bytes of artifacts known to the registry (LRU, bounded in bytes)."""

    def __init__(self, max_total: int = CACHE_MAX_TOTAL_BYTES) -> None:
        self.max_total = max_total
        self._lock = threading.Lock()
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._total = 0

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            blob = self._blobs.get(sha)
            if blob is not None:
                self._blobs.move_to_end(sha)
            return blob

    def put(self, sha: str, blob: bytes) -> None:
        if len(blob) > min(CACHE_MAX_ARTIFACT_BYTES, self.max_total):
            return
        with self._lock:
            if sha in self._blobs:
                return
            self._blobs[sha] = blob
            self._total += len(blob)
            while self._total > self.max_total:
                _, old = self._blobs.popitem(last=False)
                self._total -= len(old)


def _cache(request: Request) -> ArtifactCache:
    state = request.app.state
    cache = getattr(state, "artifact_cache", None)
    if cache is None:  # one per app, made on first use (not at import)
        cache = state.artifact_cache = ArtifactCache()
    return cache


def _load(services: Services, sha256: str) -> tuple[Path, bytes | None]:
    """Registry check and file read (thread pool). Raises NotFoundError."""
    with services.sessions() as session:
        known = registry.artifact_known(session, sha256=sha256)
    if not known or not services.store.exists(sha256):
        raise NotFoundError(f"no artifact {sha256}")
    path = services.store.path(sha256)
    if path.stat().st_size > CACHE_MAX_ARTIFACT_BYTES:
        return path, None
    return path, path.read_bytes()


def _headers(sha256: str) -> dict[str, str]:
    return {
        "Accept-Ranges": "bytes",
        "ETag": f'"{sha256}"',
        "Cache-Control": "public, max-age=31536000, immutable",
    }


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """(first, last) of a single satisfiable range; None: serve everything; False: 416."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if m is None:
        return None  # several ranges or another unit: the whole body
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return False
    return start, end


@router.get("/{sha256}", response_class=Response)
async def get_artifact(sha256: str, request: Request, services: ServicesDep) -> Response:
    check_sha256(sha256)
    cache = _cache(request)
    blob = cache.get(sha256)
    if blob is None:
        path, blob = await run_in_threadpool(_load, services, sha256)
        if blob is None:  # too large for memory: Starlette streams it (and answers Range)
            return FileResponse(
                path, media_type="application/octet-stream", headers=_headers(sha256)
            )
        cache.put(sha256, blob)
    headers = _headers(sha256)
    size = len(blob)
    if_range = request.headers.get("if-range")
    wanted = _byte_range(request.headers.get("range"), size)
    if if_range is not None and if_range.strip() != headers["ETag"]:
        wanted = None
    if wanted is False:
        headers["Content-Range"] = f"bytes */{size}"
        return Response(status_code=416, headers=headers)
    if wanted is None or wanted is True:
        return Response(blob, media_type="application/octet-stream", headers=headers)
    first, last = wanted
    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return Response(
        blob[first : last + 1],
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )
