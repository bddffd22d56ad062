"""Content-addressed artifact store: model files named by their sha256, verified on ingest.

Two backends behind one interface (:class:`ArtifactStore`): a local directory (the default) and
an S3-compatible object store shared by several server processes and training workers
(``EDGELOOP_ARTIFACT_STORE_URL=s3://bucket/prefix``, the ``s3`` extra). The settings pick one:
:func:`open_artifact_store`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.core.config import Settings
from server.core.errors import ConfigError
from server.release.artifacts._local import LocalArtifactStore
from server.release.artifacts._store import SHA256_RE, ArtifactStore, StoredObject, check_sha256

__all__ = [
    "SHA256_RE",
    "ArtifactStore",
    "LocalArtifactStore",
    "StoredObject",
    "check_sha256",
    "open_artifact_store",
]


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The store ``settings.artifact_store_url`` names; empty: ``data_dir/artifacts``.

    Raises:
        ConfigError: the URL is neither ``file:///absolute/dir`` nor ``s3://bucket[/prefix]``,
            or an s3 store is asked for without the ``s3`` extra installed.
    """
    url = settings.artifact_store_url.strip()
    if not url:
        return LocalArtifactStore(settings.artifacts_dir)
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path or parts.query:
            raise ConfigError(f"artifact store URL {url!r} must be file:///absolute/dir")
        return LocalArtifactStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        # Imported here: obstore is the optional `s3` extra, needed only by this backend.
        from server.release.artifacts._object import ObjectArtifactStore, s3_store

        store = s3_store(
            url,
            endpoint_url=settings.artifact_s3_endpoint_url,
            region=settings.artifact_s3_region,
            access_key_id=settings.artifact_s3_access_key_id,
            secret_access_key=settings.artifact_s3_secret_access_key,
        )
        return ObjectArtifactStore(
            store, url=url.rstrip("/"), cache_dir=settings.data_dir / "artifact-cache"
        )
    raise ConfigError(
        f"artifact store URL {url!r} must be file:///absolute/dir or s3://bucket[/prefix]"
    )
