"""A real server (uvicorn on a free port) holding releases of real ONNX models, for exports.

The root chain has two versions: the server first starts with online key A (the development
root v1 certifies it), then with key B, which extends the chain to root v2 (a rotation). So a
release verifies on a device pinned to root v1 only through root v2, and every part of an
exported bundle (artifact, envelope, each root) matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.core.config import Settings
from server.db.registry import ModelLine, ModelVersion
from server.main import create_app
from server.release.signing import load_signer, sign_release
from server.services import Services
from tests.conftest import free_port, write_key_pair
from tests.server.conftest import make_settings
from tests.server.live_server import LiveServer

LINE = "digits"


@dataclass
class ReleaseServer:
    url: str
    services: Services
    trust_dir: Path

    @property
    def pinned_root(self) -> Path:
        """Root v1: what a device of this fleet is provisioned with."""
        return self.trust_dir / "1.root.json"

    def add_release(
        self, version: int, onnx: bytes, *, now: datetime | None = None, ttl_days: int = 30
    ) -> int:
        """Store ``onnx`` as model ``version`` and sign a release of it; returns its number."""
        services = self.services
        sha, size = services.store.put_bytes(onnx)
        with services.sessions() as session:
            line = session.get(ModelLine, LINE)
            assert line is not None
            session.add(
                ModelVersion(
                    line=LINE,
                    version=version,
                    status="champion",
                    sha256=sha,
                    size=size,
                    parent_version=line.champion_version,
                    dataset_version=f"ds-{version}",
                    trainer="sklearn-mlp",
                    hyperparams={},
                    metrics={},
                    report={"opset": 13},
                    sample_count=0,
                )
            )
            session.flush()
            rel = sign_release(
                session,
                signer=services.signer,
                line_name=LINE,
                model_version=version,
                now=now or services.clock(),
                ttl_days=ttl_days,
            )
            line.champion_version = version
            line.current_release = rel.release
            number = rel.release
            session.commit()
        return int(number)


@contextmanager
def release_server(tmp_path: Path) -> Iterator[ReleaseServer]:
    data_dir = tmp_path / "var"
    key_a, _ = write_key_pair(tmp_path / "key-a", Ed25519PrivateKey.generate())
    first = load_signer(
        Settings(data_dir=data_dir, database_url="sqlite://", signing_key_path=key_a)
    )
    assert first.chain is not None and first.chain.latest.version == 1
    key_b, _ = write_key_pair(tmp_path / "key-b", Ed25519PrivateKey.generate())
    port = free_port()  # first: the app's public_url names it
    app = create_app(
        make_settings(
            tmp_path,
            f"sqlite:///{tmp_path}/export.db",
            signing_key_path=key_b,
            bootstrap_line=LINE,
            public_url=f"http://127.0.0.1:{port}",
        )
    )
    services: Services = app.state.services
    assert services.signer.chain is not None and services.signer.chain.latest.version == 2
    with LiveServer(app, port=port) as srv:
        yield ReleaseServer(srv.url, services, data_dir / "trust")


def expired(services: Services) -> datetime:
    """A signing time whose 1-day release expired long ago."""
    return services.clock() - timedelta(days=10)
