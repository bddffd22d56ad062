"""The edgeloop wire contract, defined once and imported by the server and the agent.

Everything that crosses a process boundary is described here: the signed model manifest and its
envelope, the MQTT topic names, the JSON messages on those topics and on the HTTP API that
devices call, and the monitoring reference and summaries (``contract.monitoring``). Verifying
needs only the standard library (Ed25519 through the libcrypto the ``ssl`` module has loaded, see
``contract.ed25519``); signing also needs ``cryptography``, imported only by the functions that
sign. An edge device imports it without the server's or trainer's
dependencies.

Exception tree::

    ContractError                 (bad content: never retried, always reported)
    ├── SignatureError            (envelope not signed by a trusted key, or malformed)
    ├── ManifestError             (signed payload does not describe a valid manifest)
    ├── MessageError              (an MQTT/HTTP message does not match its schema)
    └── RootError                 (root metadata invalid or not the next trusted version)
"""

from contract._errors import (
    ContractError,
    ManifestError,
    MessageError,
    RootError,
    SignatureError,
)
from contract.envelope import (
    PAYLOAD_TYPE,
    SignedEnvelope,
    key_id,
    load_private_key,
    load_public_key,
    pae,
    sign_payload,
    verify_envelope,
)
from contract.manifest import OUTPUT_NAME, ArtifactRef, InputSpec, Manifest, verify_manifest
from contract.messages import (
    DeviceState,
    MetricsReport,
    SampleRecord,
    StatusReport,
    TargetMessage,
    decode_input,
    encode_input,
)
from contract.monitoring import MonitoringReference, MonitorSummary
from contract.topics import TOPIC_PREFIX, Topics

__all__ = [
    "OUTPUT_NAME",
    "PAYLOAD_TYPE",
    "TOPIC_PREFIX",
    "ArtifactRef",
    "ContractError",
    "DeviceState",
    "InputSpec",
    "Manifest",
    "ManifestError",
    "MessageError",
    "MetricsReport",
    "MonitorSummary",
    "MonitoringReference",
    "RootError",
    "SampleRecord",
    "SignatureError",
    "SignedEnvelope",
    "StatusReport",
    "TargetMessage",
    "Topics",
    "decode_input",
    "encode_input",
    "key_id",
    "load_private_key",
    "load_public_key",
    "pae",
    "sign_payload",
    "verify_envelope",
    "verify_manifest",
]
