"""An edge device installs only the agent's dependencies: importing the agent must not pull in
anything from the server or trainer side, nor ``cryptography`` (the agent only verifies
signatures, through the libcrypto the ``ssl`` module loads: ~8 MB less resident memory), nor
pydantic (its config is checked by ``device_agent.config``: ~10 MB less), nor httpx."""

from __future__ import annotations

import json
from pathlib import Path

from contract.ed25519 import BACKEND_ENV
from device_agent.runtime import TELEMETRY_ENV
from tests.conftest import run_python

FORBIDDEN = (
    "torch",
    "torchvision",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "sklearn",
    "pydantic",
    "onnx",
    "skl2onnx",
    "server",
    "training",
    "firmware_sim",
    "cryptography",  # the agent only verifies: contract.ed25519 calls the loaded libcrypto
)

PROBE = """
import json, sys
import device_agent, device_agent.cli, device_agent.agent, device_agent.mqtt
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""


def test_import_pulls_in_no_server_or_training_modules() -> None:
    out = run_python(PROBE)
    loaded = set(json.loads(out.stdout))
    assert loaded.isdisjoint(FORBIDDEN), loaded & set(FORBIDDEN)
    assert {"numpy", "paho", "contract"} <= loaded
    # onnxruntime is imported when the first model loads, not by importing the agent.
    assert "onnxruntime" not in loaded
    # The agent's HTTP client is urllib3 (device_agent/http.py, ~1.3 MB): httpx and its
    # dependencies cost ~7 MB of resident memory on the device.
    assert "urllib3" in loaded
    assert loaded.isdisjoint({"httpx", "httpcore", "h11", "anyio", "certifi"}), loaded


# A real agent, started the way benchmarks/agent_footprint.py starts one: it re-verifies its
# installed signed model at start, then serves.
AGENT = r"""
import json, os, sys
from pathlib import Path
os.environ["HOME"] = sys.argv[3]  # before anything imports onnxruntime
import numpy as np
from device_agent import Agent, AgentConfig
from contract import ed25519
verified = []  # results of libcrypto verifications: the self-check's two, then the agent's
_verify = ed25519._OpenSSLBackend.verify
def counting(self, *args):
    verified.append(_verify(self, *args))
    return verified[-1]
ed25519._OpenSSLBackend.verify = counting
cfg = AgentConfig(device_id="hygiene-1", model_line="digits", state_dir=Path(sys.argv[1]),
                  trusted_keys=[Path(sys.argv[2]).read_bytes()],
                  server_url="http://127.0.0.1:9", mqtt_port=9)
agent = Agent(cfg)
agent.start()
try:
    ready = agent.wait_ready(30)
    p = agent.predict(np.zeros(64, dtype=np.float32)) if ready else None
finally:
    agent.stop()
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")
ort_py = sorted(m for m in sys.modules if m.split(".")[0] == "onnxruntime")
print(json.dumps({"ready": ready, "model_version": p and p.model_version, "verified": verified,
                  "cryptography": loaded, "backend": ed25519.backend_name(),
                  "onnxruntime": ort_py[:1],
                  "home": sorted(str(p) for p in Path(sys.argv[3]).rglob("*"))}))
"""


def test_agent_verifies_and_serves_without_cryptography(tmp_path: Path) -> None:
    from benchmarks.agent_bench import write_installed_state

    state, pub = write_installed_state(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    out = run_python(AGENT, str(state), str(pub), str(home), unset=(BACKEND_ENV, TELEMETRY_ENV))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    verified = result.pop("verified")
    assert result == {
        "ready": True,
        "model_version": 1,
        "cryptography": [],
        "backend": "openssl",
        "onnxruntime": ["onnxruntime"],  # the package serves
        "home": [],  # ONNX Runtime's telemetry wrote nothing (device_agent.runtime)
    }, out.stderr[-2000:]
    # The backend's self-check (valid, then one bit flipped), then the installed manifest.
    assert verified[:2] == [True, False] and True in verified[2:], verified
