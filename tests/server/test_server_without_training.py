"""A server runs without the training libraries: nothing on its import path or in its request
handling loads torch, scikit-learn or the ONNX exporters (the fresh-venv proof is
``scripts/check_server_install.sh``; this is the quick one, in every pytest run)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_python, upgraded

SCRIPT = r"""
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "sklearn", "skl2onnx", "onnx"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the server must not need it")
        return None

sys.meta_path.insert(0, Block())
from pathlib import Path
from fastapi.testclient import TestClient
import server.cli.main  # the operator CLI, `edgeloop worker` included (its imports)
from server.core.config import Settings
from server.main import create_app

tmp = Path(sys.argv[1])
settings = Settings(
    environment="development", embedded_worker=False, database_url=sys.argv[2],
    data_dir=tmp, enable_mqtt=False, bootstrap_line="digits",
)
app = create_app(settings)
with TestClient(app) as client:
    h = {"Authorization": "Bearer edgeloop-dev-admin-token"}
    assert client.get("/healthz").status_code == 200
    line = client.get("/api/v1/model-lines/digits", headers=h).json()
    jobs = client.get("/api/v1/training-jobs", headers=h).json()
    assert [j["status"] for j in jobs] == ["queued"], jobs
    assert app.state.services.jobs.run_once() is None  # no worker here: it stays queued
print("loaded:", sorted({m.split(".")[0] for m in sys.modules} & BLOCKED), line["name"])
"""


def test_the_server_imports_and_serves_with_torch_and_sklearn_blocked(tmp_path: Path) -> None:
    db = upgraded(f"sqlite:///{tmp_path}/edgeloop.db")
    done = run_python(SCRIPT, str(tmp_path / "var"), db)
    assert done.stdout.strip().endswith("loaded: [] digits"), done.stdout + done.stderr
