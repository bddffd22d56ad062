"""Model bytes by sha256, with HTTP Range, from whichever artifact store the server uses.

Artifacts are content-addressed and immutable, so a model is read from the store once and served
from memory to every device that downloads it (``ArtifactCache``, bounded): a fleet downloading one
release costs one event-loop response per request, not a thread-pool hop, a database query and a
store read each (measured: about 50 downloads/s on 2 cores with 1,000 devices downloading at
once, the rollout's bottleneck). Artifacts too large for the cache are streamed from the store,
one bounded chunk at a time, only the range asked for.

Any server process sharing the database and the store serves any artifact, whichever process
stored it. With ``Settings.artifact_base_url`` devices download from a CDN or the bucket instead.

Range: one ``bytes=a-b`` / ``a-`` / ``-n`` range is answered 206 with Content-Range; an
unsatisfiable one 416 with ``Content-Range: bytes */size``; several ranges, or an ``If-Range``
that is not our ETag, get the whole body (200), which RFC 9110 allows.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.deps import ServicesDep
from server.core.errors import ArtifactNotFoundError, NotFoundError
from server.db import registry
from server.release.artifacts import check_sha256
from server.services import Services

router = APIRouter(prefix="/api/v1/artifacts", tags=["artifacts"])

CACHE_MAX_ARTIFACT_BYTES = 32 * 1024 * 1024  # bytes; larger artifacts are streamed from the store
CACHE_MAX_TOTAL_BYTES = 256 * 1024 * 1024  # bytes held by one server process
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class ArtifactCache:
    """sha256 -> bytes of artifacts known to the registry (LRU, bounded in bytes)."""

    def __init__(
        self,
        max_total: int = CACHE_MAX_TOTAL_BYTES,
        max_artifact: int = CACHE_MAX_ARTIFACT_BYTES,
    ) -> None:
        self.max_total = max_total
        self.max_artifact = min(max_artifact, max_total)  # bytes of the largest one cached
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
        if len(blob) > self.max_artifact:
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


def _load(services: Services, sha256: str, max_cached: int) -> tuple[int, bytes | None]:
    """Registry check, size, and the bytes when they are cacheable (thread pool).

    Raises:
        NotFoundError: the registry or the store does not know the artifact.
    """
    with services.sessions() as session:
        known = registry.artifact_known(session, sha256=sha256)
    if not known:
        raise NotFoundError(f"no artifact {sha256}")
    try:
        size = services.store.size(sha256)
        if size > max_cached:
            return size, None
        return size, services.store.read_bytes(sha256)
    except ArtifactNotFoundError as exc:  # without the store's URL: it is not the client's business
        raise NotFoundError(f"no artifact {sha256}") from exc


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
        size, blob = await run_in_threadpool(_load, services, sha256, cache.max_artifact)
        if blob is not None:
            cache.put(sha256, blob)
    else:
        size = len(blob)
    headers = _headers(sha256)
    if_range = request.headers.get("if-range")
    wanted = _byte_range(request.headers.get("range"), size)
    if if_range is not None and if_range.strip() != headers["ETag"]:
        wanted = None
    if wanted is False:
        headers["Content-Range"] = f"bytes */{size}"
        return Response(status_code=416, headers=headers)
    status = 200
    first, last = 0, size - 1
    if isinstance(wanted, tuple):
        status = 206
        first, last = wanted
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    if blob is not None:
        return Response(
            blob[first : last + 1],
            status_code=status,
            media_type="application/octet-stream",
            headers=headers,
        )
    # Too large for memory: stream the range from the store (checked before the status is sent).
    chunks: Iterator[bytes] = await run_in_threadpool(
        services.store.iter_range, sha256, first, last + 1
    )
    headers["Content-Length"] = str(last + 1 - first)
    return StreamingResponse(
        chunks, status_code=status, media_type="application/octet-stream", headers=headers
    )
