"""An edge device installs only the agent's dependencies: importing the agent must not pull in
anything from the server or trainer side."""

from __future__ import annotations

import json
import subprocess
import sys

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
)

PROBE = """
import json, sys
import device_agent, device_agent.cli, device_agent.agent, device_agent.mqtt
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""


def test_import_pulls_in_no_server_or_training_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert loaded.isdisjoint(FORBIDDEN), loaded & set(FORBIDDEN)
    assert {"onnxruntime", "numpy", "paho", "cryptography", "contract"} <= loaded
    # The agent's HTTP client is the standard library's (device_agent/http.py): httpx and its
    # dependencies cost ~7 MB of resident memory on the device.
    assert loaded.isdisjoint({"httpx", "httpcore", "h11", "anyio", "certifi"}), loaded
