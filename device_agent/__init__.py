"""edgeloop device agent: serve a signed ONNX model, capture hard samples, update safely.

Edge dependencies only: the standard library, numpy, onnxruntime, paho-mqtt, cryptography,
httpx and ``contract``.
"""

import sys

# httpx imports its command-line tool (rich, click, pygments: ~10 MB and ~70 ms) whenever those
# happen to be installed; the agent never uses it. A None entry makes that optional import fail
# fast, exactly as on a device where they are absent.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from device_agent.agent import Agent, Prediction  # noqa: E402
from device_agent.config import AGENT_VERSION, AgentConfig, load_config  # noqa: E402
from device_agent.errors import (  # noqa: E402
    AgentError,
    ConfigError,
    ContentError,
    ExpiredManifestError,
    HashMismatchError,
    InferenceError,
    LengthError,
    ManifestInvalidError,
    ModelLineMismatchError,
    ModelLoadError,
    NoModelError,
    RollbackRefusedError,
    SignatureInvalidError,
    TransportError,
    UnknownPredictionError,
)

__version__ = AGENT_VERSION

__all__ = [
    "AGENT_VERSION",
    "Agent",
    "AgentConfig",
    "AgentError",
    "ConfigError",
    "ContentError",
    "ExpiredManifestError",
    "HashMismatchError",
    "InferenceError",
    "LengthError",
    "ManifestInvalidError",
    "ModelLineMismatchError",
    "ModelLoadError",
    "NoModelError",
    "Prediction",
    "RollbackRefusedError",
    "SignatureInvalidError",
    "TransportError",
    "UnknownPredictionError",
    "load_config",
]
