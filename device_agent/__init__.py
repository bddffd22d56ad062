"""edgeloop device agent: serve a signed ONNX model, capture hard samples, update safely.

Edge dependencies only: the standard library, numpy, onnxruntime, paho-mqtt, urllib3 and
``contract``.
Signatures are verified through the libcrypto the ``ssl`` module loads (``contract.ed25519``);
``cryptography`` is never imported unless that backend is unusable.
"""

from device_agent.agent import Agent, Prediction
from device_agent.config import AGENT_VERSION, AgentConfig, load_config
from device_agent.errors import (
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
