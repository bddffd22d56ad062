"""The object-store backend: ``<prefix>/<sha256>`` in an S3-compatible bucket, through obstore.

Several server processes (and training workers) on different hosts share one bucket, so a
device gets the same bytes whichever process it asks, or straight from the bucket or a CDN in
front of it (``Settings.artifact_base_url``).

obstore (the Rust ``object_store`` crate behind a Python API) is used because it has a native
synchronous API, no dependency of its own (s3fs brings aiobotocore, which pins botocore, and an
event-loop thread), and it names the guarantees this store needs: a put is atomic, and a
multipart upload whose input raises is aborted, so a reader never sees part of an object.

Writes: the bytes are named by their sha256 before they are sent (a local file is hashed first;
a stream comes with its expected hash) and are hashed again while sent; the input raises instead
of ending when the hash does not check (``verified_chunks``), and obstore then aborts the
multipart upload (or never sends the single PUT), so wrong or truncated bytes never appear.

Reads fetch one bounded range per request (``CHUNK_BYTES``), so a slow reader (a device on a poor
link behind the server's download route) never holds one request open for longer than a chunk
takes, and every read of an immutable object is consistent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from server.core.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    ArtifactStoreUnavailableError,
    ConfigError,
)
from server.release.artifacts._store import (
    CHUNK_BYTES,
    SHA256_RE,
    ArtifactStore,
    StoredObject,
    check_range,
    check_sha256,
    verified_chunks,
    write_atomic,
)

try:
    import obstore
    from obstore.exceptions import BaseError as ObstoreError
    from obstore.store import S3Store
except ImportError as exc:  # the `s3` extra is not installed
    raise ConfigError("an s3:// artifact store needs obstore: pip install 'edgeloop[s3]'") from exc

PART_BYTES = 8 * 1024 * 1024  # bytes per part of a multipart upload (S3's minimum is 5 MiB)
CONNECT_TIMEOUT_S = 10  # seconds to open a connection to the object store
REQUEST_TIMEOUT_S = 120  # seconds for one request: a part of an upload or a chunk of a read
MAX_RETRIES = 3  # retries of a failed request, with backoff (obstore's own retry)
RETRY_TIMEOUT_S = 60  # seconds after which a request is no longer retried
_MESSAGE_CHARS = 300  # characters of a backend error kept in ours (they carry a debug dump)

T = TypeVar("T")


def s3_store(
    url: str,
    *,
    endpoint_url: str = "",
    region: str = "",
    access_key_id: str = "",
    secret_access_key: str = "",
) -> S3Store:
    """An obstore S3Store for ``s3://bucket[/prefix]``.

    Each empty argument falls back to the standard AWS environment, as obstore reads it
    (``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, instance and web-identity credentials).
    An http:// endpoint, from the argument or the environment, is allowed (a local MinIO).

    Raises:
        ConfigError: the URL is not ``s3://bucket[/prefix]``, or the endpoint is not http(s).
    """
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"artifact store URL {url!r} must be s3://bucket[/prefix]")
    prefix = parts.path.strip("/")
    config: dict[str, Any] = {}
    client: dict[str, Any] = {
        "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_S),
        "timeout": timedelta(seconds=REQUEST_TIMEOUT_S),
    }
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint:
        scheme = urlsplit(endpoint).scheme
        if scheme not in ("http", "https"):
            raise ConfigError(f"artifact store endpoint {endpoint!r} must be http(s)://...")
        config["endpoint"] = endpoint.rstrip("/")
        client["allow_http"] = scheme == "http"  # named by the operator: a local MinIO, say
    if region:
        config["region"] = region
    if access_key_id:
        config["access_key_id"] = access_key_id
    if secret_access_key:
        config["secret_access_key"] = secret_access_key
    try:
        return S3Store(
            parts.netloc,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options=client,  # type: ignore[arg-type]
            retry_config={
                "max_retries": MAX_RETRIES,
                "retry_timeout": timedelta(seconds=RETRY_TIMEOUT_S),
            },
        )
    except (ObstoreError, ValueError, TypeError) as exc:
        raise ConfigError(f"artifact store {url}: {_short(exc)}") from exc


class ObjectArtifactStore(ArtifactStore):
    """Model files by their sha256 in an object store (any obstore store; S3 in production).

    Args:
        store: the obstore store, already pointing at the bucket and prefix.
        url: how to name it in messages and logs (``s3://bucket/prefix``), no credentials.
        cache_dir: where :meth:`local_path` keeps verified copies for readers that need a path.
    """

    def __init__(self, store: Any, *, url: str, cache_dir: Path) -> None:
        self._store = store
        self.url = url
        self.cache_dir = Path(cache_dir)

    def _call(self, sha: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one obstore call; its errors become ours."""
        try:
            return fn(self._store, sha, *args, **kwargs)
        except FileNotFoundError as exc:  # obstore's NotFoundError is one
            raise ArtifactNotFoundError(f"no artifact {sha} in {self.url}") from exc
        except (ObstoreError, OSError) as exc:
            raise ArtifactStoreUnavailableError(
                f"artifact store {self.url} failed on {sha}: {_short(exc)}"
            ) from exc

    def _write(self, sha: str, chunks: Iterable[bytes], size: int | None) -> None:
        # A verified iterator raises instead of ending when the bytes are wrong: obstore then
        # aborts the multipart upload (or never sends the single PUT), so nothing appears.
        source = _Source(chunks)
        try:
            obstore.put(
                self._store,
                sha,
                source,
                use_multipart=size is None or size > PART_BYTES,
                chunk_size=PART_BYTES,
            )
        except BaseException as exc:
            if source.error is not None:  # the bytes' fault, not the store's: as it was raised
                raise source.error from None
            if isinstance(exc, ObstoreError | OSError):
                raise ArtifactStoreUnavailableError(
                    f"artifact store {self.url} failed storing {sha}: {_short(exc)}"
                ) from exc
            raise

    def exists(self, sha: str) -> bool:
        check_sha256(sha)
        try:
            self._call(sha, obstore.head)
        except ArtifactNotFoundError:
            return False
        return True

    def size(self, sha: str) -> int:
        check_sha256(sha)
        return int(self._call(sha, obstore.head)["size"])

    def read_bytes(self, sha: str) -> bytes:
        check_sha256(sha)
        result = self._call(sha, obstore.get)
        try:
            return bytes(result.bytes())
        except (ObstoreError, OSError) as exc:
            raise ArtifactStoreUnavailableError(
                f"artifact store {self.url} failed reading {sha}: {_short(exc)}"
            ) from exc

    def iter_range(self, sha: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        first, stop = check_range(sha, start, end, self.size(sha))
        return self._ranges(sha, first, stop)

    def _ranges(self, sha: str, start: int, stop: int) -> Iterator[bytes]:
        pos = start
        while pos < stop:
            upto = min(stop, pos + CHUNK_BYTES)
            chunk = bytes(self._call(sha, obstore.get_range, start=pos, end=upto))
            if len(chunk) != upto - pos:
                raise ArtifactError(
                    f"artifact store {self.url} answered {len(chunk)} bytes for {sha}[{pos}:{upto}]"
                )
            pos = upto
            yield chunk

    def local_path(self, sha: str) -> Path:
        path = self.cache_dir / check_sha256(sha)
        if not path.is_file():  # objects are immutable: a cached copy never goes stale
            write_atomic(verified_chunks(self.iter_range(sha), sha, f"artifact {sha}"), path)
        return path

    def delete(self, sha: str) -> None:
        check_sha256(sha)
        self._call(sha, obstore.delete)  # S3 answers a delete of a missing key with success
        (self.cache_dir / sha).unlink(missing_ok=True)

    def list_objects(self) -> Iterator[StoredObject]:
        try:
            for batch in obstore.list(self._store):
                for meta in batch:  # paths are relative to the store's prefix
                    name = str(meta["path"]).rsplit("/", 1)[-1]
                    if SHA256_RE.fullmatch(name):
                        yield StoredObject(name, int(meta["size"]), meta["last_modified"])
        except (ObstoreError, OSError) as exc:
            raise ArtifactStoreUnavailableError(
                f"artifact store {self.url} failed listing its objects: {_short(exc)}"
            ) from exc


class _Source:
    """Iterates ``chunks``, keeping the exception it raised (to tell it from the store's)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise
        except BaseException as exc:
            self.error = exc
            raise


def _short(exc: BaseException) -> str:
    """The first line of a backend error, bounded: obstore appends a multi-line debug dump."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text[:_MESSAGE_CHARS]
