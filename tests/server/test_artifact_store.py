"""The artifact store's contract, run against both backends.

``local``: a directory (LocalArtifactStore). ``s3``: ObjectArtifactStore on a real
S3-compatible HTTP server started here (moto's ThreadedMotoServer, tests/server/s3_kit.py),
each test in a bucket of its own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.core.config import Settings
from server.core.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    ArtifactStoreUnavailableError,
    ConfigError,
    InvalidRequestError,
)
from server.release.artifacts import ArtifactStore, LocalArtifactStore, open_artifact_store
from server.release.artifacts._store import CHUNK_BYTES
from tests.server.s3_kit import S3Server, s3_server

MISSING = "0" * 64


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ArtifactStore, Any]:
    """(store, how to reach its objects behind its back: a directory or a bucket)."""
    if request.param == "local":
        store = open_artifact_store(Settings(data_dir=tmp_path / "var"))
        assert isinstance(store, LocalArtifactStore)
        return store, store.root
    s3: S3Server = request.getfixturevalue("s3")
    bucket = s3.new_bucket()
    settings = Settings(data_dir=tmp_path / "var", **s3.store_settings(bucket))
    store = open_artifact_store(settings)
    assert store.url == f"s3://{bucket}/models"
    return store, (s3, bucket)


@pytest.fixture
def store(backend: tuple[ArtifactStore, Any]) -> ArtifactStore:
    return backend[0]


def blob(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def overwrite_behind_back(backend: tuple[ArtifactStore, Any], key: str, data: bytes) -> None:
    """Replace an object's bytes without the store (disk rot, a wrong copy in the bucket)."""
    store, where = backend
    if isinstance(where, Path):
        (where / key).write_bytes(data)
    else:
        s3, bucket = where
        s3.client().put_object(Bucket=bucket, Key=f"models/{key}", Body=data)


def test_put_bytes_then_read_it_back(store: ArtifactStore) -> None:
    data = blob(3000)
    assert not store.exists(sha(data))
    assert store.put_bytes(data) == (sha(data), 3000)
    assert store.exists(sha(data))
    assert store.size(sha(data)) == 3000
    assert store.read_bytes(sha(data)) == data
    assert b"".join(store.iter_range(sha(data))) == data
    assert store.put_bytes(data) == (sha(data), 3000)  # idempotent: same name, same bytes


def test_put_file_names_the_bytes_and_checks_the_expected_hash(
    store: ArtifactStore, tmp_path: Path
) -> None:
    data = blob(5000, seed=1)
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    assert store.put_file(src) == (sha(data), 5000)
    assert store.put_file(src, expected_sha256=sha(data)) == (sha(data), 5000)
    assert store.read_bytes(sha(data)) == data


def test_wrong_hash_is_refused_and_nothing_is_stored(store: ArtifactStore, tmp_path: Path) -> None:
    data, other = blob(4000, seed=2), blob(4000, seed=3)
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    with pytest.raises(ArtifactError, match=f"expected {sha(other)}"):
        store.put_file(src, expected_sha256=sha(other))
    with pytest.raises(ArtifactError, match=f"expected {sha(other)}"):
        store.put_stream([data], expected_sha256=sha(other))
    assert not store.exists(sha(other))
    assert not store.exists(sha(data))


def test_refuses_empty_unreadable_and_malformed_input(store: ArtifactStore, tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ArtifactError, match="empty"):
        store.put_file(empty)
    with pytest.raises(ArtifactError, match="empty"):
        store.put_bytes(b"")
    with pytest.raises(ArtifactError, match="empty"):
        store.put_stream([], expected_sha256=sha(b""))
    with pytest.raises(ArtifactError, match="cannot read"):
        store.put_file(tmp_path / "absent.onnx")
    for bad in ("", "xyz", "A" * 64, "0" * 63, "0" * 64 + "\n", "../" + "0" * 61):
        with pytest.raises(InvalidRequestError, match="64 lowercase hex"):
            store.exists(bad)
        with pytest.raises(InvalidRequestError, match="64 lowercase hex"):
            store.put_file(empty, expected_sha256=bad)
    assert not any(True for _ in _objects(store))


def test_missing_object_is_a_clear_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    assert not store.exists(MISSING)
    dest = tmp_path / "out" / "model.onnx"
    calls = [
        lambda: store.size(MISSING),
        lambda: store.read_bytes(MISSING),
        lambda: store.iter_range(MISSING, 0, 10),
        lambda: store.get_file(MISSING, dest),
        lambda: store.local_path(MISSING),
    ]
    for call in calls:
        with pytest.raises(ArtifactNotFoundError, match=f"no artifact {MISSING} in "):
            call()
    assert not dest.exists()
    store.delete(MISSING)  # deleting what is gone is no error


def test_ranged_reads_across_chunk_boundaries(store: ArtifactStore) -> None:
    data = os.urandom(CHUNK_BYTES + 4096)  # two chunks of a read (and two upload parts on S3)
    name, size = store.put_stream(_pieces(data, 1 << 20), expected_sha256=sha(data))
    assert (name, size) == (sha(data), len(data))
    assert b"".join(store.iter_range(name, 10, 20)) == data[10:20]
    edge = CHUNK_BYTES
    assert b"".join(store.iter_range(name, edge - 3, edge + 3)) == data[edge - 3 : edge + 3]
    assert b"".join(store.iter_range(name, len(data) - 5)) == data[-5:]
    assert b"".join(store.iter_range(name, len(data))) == b""
    assert b"".join(store.iter_range(name)) == data
    for start, end in ((0, len(data) + 1), (-1, 5), (20, 10), (len(data) + 1, None)):
        with pytest.raises(InvalidRequestError, match="outside artifact"):
            store.iter_range(name, start, end)


def test_truncated_upload_never_appears(store: ArtifactStore, backend: Any) -> None:
    data = os.urandom(CHUNK_BYTES + 4096)

    def dropped() -> Iterator[bytes]:  # the connection dies after most of the bytes
        yield from _pieces(data[: CHUNK_BYTES + 1024], 1 << 20)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream(dropped(), expected_sha256=sha(data))
    assert not store.exists(sha(data))
    # A body that simply ends early: refused before its last bytes are sent.
    with pytest.raises(ArtifactError, match=f"expected {sha(data)}"):
        store.put_stream(_pieces(data[:-1], 1 << 20), expected_sha256=sha(data))
    assert not store.exists(sha(data))
    assert list(_objects(store)) == []
    where = backend[1]
    if not isinstance(where, Path):
        s3, bucket = where
        assert s3.pending_uploads(bucket) == []  # the multipart uploads were aborted


def test_get_file_copies_verified_bytes(store: ArtifactStore, backend: Any, tmp_path: Path) -> None:
    data = blob(7000, seed=4)
    name, _ = store.put_bytes(data)
    dest = tmp_path / "job" / "champion.onnx"
    assert store.get_file(name, dest) == 7000
    assert dest.read_bytes() == data
    assert store.local_path(name).read_bytes() == data
    # The stored bytes rot: a copy out refuses them and leaves its destination alone.
    overwrite_behind_back(backend, name, blob(7000, seed=5))
    dest.write_bytes(b"previous good copy")
    with pytest.raises(ArtifactError, match=f"expected {name}"):
        store.get_file(name, dest)
    assert dest.read_bytes() == b"previous good copy"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["champion.onnx"]  # no temp left


def test_delete(store: ArtifactStore) -> None:
    name, _ = store.put_bytes(blob(100, seed=6))
    store.local_path(name)
    store.delete(name)
    assert not store.exists(name)
    with pytest.raises(ArtifactNotFoundError):
        store.read_bytes(name)
    with pytest.raises(ArtifactNotFoundError):
        store.local_path(name)


def test_list_objects_names_every_object_and_nothing_else(
    store: ArtifactStore, backend: Any
) -> None:
    a, b = blob(100, seed=7), blob(CHUNK_BYTES + 5, seed=8)
    names = {store.put_bytes(a)[0]: len(a), store.put_bytes(b)[0]: len(b)}
    overwrite_behind_back(backend, "not-an-artifact.tmp", b"a stray file")
    listed = list(store.list_objects())
    assert {o.sha256: o.size for o in listed} == names
    assert all(o.stored_at.utcoffset() is not None for o in listed)  # aware: compared in UTC
    store.delete(sha(a))
    assert [o.sha256 for o in store.list_objects()] == [sha(b)]


def test_unreachable_object_store_is_a_transient_error(tmp_path: Path) -> None:
    from firmware_sim.services import free_port

    settings = Settings(
        data_dir=tmp_path,
        artifact_store_url="s3://nowhere/models",
        artifact_s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens
        artifact_s3_region="us-east-1",
        artifact_s3_access_key_id="k",
        artifact_s3_secret_access_key="s",
    )
    store = open_artifact_store(settings)
    with pytest.raises(ArtifactStoreUnavailableError, match="artifact store s3://nowhere/models"):
        store.exists(MISSING)
    with pytest.raises(ArtifactStoreUnavailableError) as info:
        store.put_bytes(b"model")
    assert info.value.transient and info.value.status_code == 503


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/dir", "must be file:///absolute/dir or s3://bucket"),
        ("/var/artifacts", "must be file:///absolute/dir or s3://bucket"),
        ("file://otherhost/dir", "must be file:///absolute/dir"),
        ("s3://", "must be s3://bucket"),
        ("s3:///prefix", "must be s3://bucket"),
        ("s3://bucket/p?x=1", "must be s3://bucket"),
    ],
)
def test_store_url_refused_with_a_clear_error(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_artifact_store(Settings(data_dir=tmp_path, artifact_store_url=url))


def test_store_url_choices(tmp_path: Path) -> None:
    default = open_artifact_store(Settings(data_dir=tmp_path / "var"))
    assert isinstance(default, LocalArtifactStore)
    assert default.root == tmp_path / "var" / "artifacts"
    shared = open_artifact_store(
        Settings(data_dir=tmp_path, artifact_store_url=(tmp_path / "nfs dir").as_uri())
    )
    assert isinstance(shared, LocalArtifactStore) and shared.root == tmp_path / "nfs dir"
    with pytest.raises(ConfigError, match="endpoint 'minio:9000' must be http"):
        open_artifact_store(
            Settings(
                data_dir=tmp_path,
                artifact_store_url="s3://b",
                artifact_s3_endpoint_url="minio:9000",
            )
        )


def test_artifact_base_url_setting() -> None:
    assert Settings(public_url="https://edge.example").artifact_url_base == (
        "https://edge.example/api/v1/artifacts"
    )
    cdn = Settings(artifact_base_url="https://cdn.example/models/")
    assert cdn.artifact_url_base == "https://cdn.example/models"
    for bad in ("cdn.example/models", "ftp://cdn.example", "https://cdn.example/m?sig=1"):
        with pytest.raises(ValueError, match="must be an http"):
            Settings(artifact_base_url=bad)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _objects(store: ArtifactStore) -> Iterator[str]:
    """Names of the objects a store holds (for 'nothing was left behind')."""
    if isinstance(store, LocalArtifactStore):
        yield from (p.name for p in store.root.iterdir())
        return
    import obstore

    for batch in obstore.list(store._store):  # type: ignore[attr-defined]
        yield from (meta["path"] for meta in batch)
