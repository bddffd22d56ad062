"""Exception family of the device agent.

Two roots matter to callers: *bad content* is never retried and is reported as REFUSED; *bad
transport* is transient, retried with backoff, and reported as FAILED once retries run out.
Foreign errors (contract, urllib3, onnxruntime) are translated at the boundary with
``raise ... from exc`` so callers only ever see this family::

    AgentError
    ├── ContentError                 (bad content: REFUSED, never retried)
    │   ├── SignatureInvalidError    (envelope malformed or not signed by a trusted key)
    │   │   └── RevokedKeyError      (signed by a release key a newer root dropped)
    │   ├── RootInvalidError         (root metadata not the next validly signed version)
    │   ├── RootExpiredError         (the newest trusted root is past its expires_at)
    │   ├── TargetingMismatchError   (release is for other devices, groups or hardware)
    │   ├── RuntimeIncompatibleError (release needs an opset/runtime this device lacks)
    │   ├── ManifestInvalidError     (signed payload is not a valid manifest)
    │   ├── ExpiredManifestError     (manifest past its expires_at)
    │   ├── ModelLineMismatchError   (target is for another model line)
    │   ├── RollbackRefusedError     (release lower than the highest accepted)
    │   ├── LengthError              (artifact larger/smaller than signed, or over the cap)
    │   ├── HashMismatchError        (artifact bytes do not match the signed sha256)
    │   ├── SelfTestError            (bundle's own self-test vectors give other answers)
    │   └── VersionRefusedError      (this device rolled the version back before)
    ├── TransportError               (network, HTTP status, timeouts: retryable, FAILED)
    │   ├── ConnectError             (connection not opened: no byte of the request was sent)
    │   ├── RedirectError            (redirect refused: plain http in production, or too many)
    │   └── SlowRetrievalError       (download slower than the configured minimum rate)
    ├── ModelLoadError               (verified artifact does not load or has the wrong shape)
    │   └── InsufficientMemoryError  (not enough free memory to load it next to the old one)
    ├── InferenceError               (ONNX Runtime failed on one inference)
    ├── NoModelError                 (predict before any model serves)
    ├── IdentityError                (enrollment refused, or the credential is refused: 401/403)
    ├── UnknownPredictionError       (feedback for a prediction id not held, or evicted)
    └── ConfigError                  (agent configuration is invalid)
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the device agent raises."""


class ContentError(AgentError):
    """The content offered is unacceptable. Retrying the same bytes cannot help."""


class SignatureInvalidError(ContentError):
    """The manifest envelope is malformed or lacks a valid signature from a trusted key."""


class RevokedKeyError(SignatureInvalidError):
    """Signed by a key that an older root allowed and the current root no longer lists."""


class RootInvalidError(ContentError):
    """Root metadata is malformed, skips a version, or lacks a threshold of root signatures."""


class RootExpiredError(ContentError):
    """The newest trusted root expired: nothing new is accepted until a fresh root arrives."""


class TargetingMismatchError(ContentError):
    """The signed targeting names other devices, groups or hardware classes."""


class RuntimeIncompatibleError(ContentError):
    """The release needs an ONNX opset or runtime version this device cannot provide."""


class ManifestInvalidError(ContentError):
    """The signed payload does not describe a valid manifest."""


class ExpiredManifestError(ContentError):
    """The manifest is validly signed but past its ``expires_at``."""


class ModelLineMismatchError(ContentError):
    """The target or manifest names a model line this device does not serve."""


class RollbackRefusedError(ContentError):
    """The release is lower than the highest release this device has accepted."""


class LengthError(ContentError):
    """The artifact size differs from the signed size, or exceeds the configured cap."""


class HashMismatchError(ContentError):
    """The artifact's sha256 differs from the signed one."""


class SelfTestError(ContentError):
    """The bundle's signed self-test vectors do not reproduce on this device."""


class VersionRefusedError(ContentError):
    """This device rolled this release back after probation: it is never installed again."""


class TransportError(AgentError):
    """A network operation failed (connection, HTTP status, timeout). Transient: retry later."""


class ConnectError(TransportError):
    """The connection could not be opened, so no byte of the request left this device."""


class RedirectError(TransportError):
    """A redirect was not followed: to a plain-http URL in production, to a scheme other than
    http(s), or past ``max_redirects``. The same URL redirects the same way, so a download does
    not retry it at once; the update is retried later (an operator may fix the mirror)."""


class SlowRetrievalError(TransportError):
    """The artifact arrived slower than ``min_download_bps`` (slow-retrieval attack defence)."""


class ModelLoadError(AgentError):
    """A verified artifact could not be turned into a working inference session."""


class InsufficientMemoryError(ModelLoadError):
    """Loading would leave less free memory than configured: the old model keeps serving."""


class InferenceError(AgentError):
    """ONNX Runtime raised while serving one inference (counted as an error in metrics)."""

    def __init__(self, message: str, *, model_version: int) -> None:
        super().__init__(message)
        self.model_version = model_version


class NoModelError(AgentError):
    """No verified model is serving yet."""


class UnknownPredictionError(AgentError):
    """Feedback names a prediction id the agent does not hold (never made, or evicted)."""


class ConfigError(AgentError):
    """The agent configuration is invalid."""


__all__ = [
    "AgentError",
    "ConfigError",
    "ConnectError",
    "ContentError",
    "ExpiredManifestError",
    "HashMismatchError",
    "InferenceError",
    "InsufficientMemoryError",
    "LengthError",
    "ManifestInvalidError",
    "ModelLineMismatchError",
    "ModelLoadError",
    "NoModelError",
    "RedirectError",
    "RevokedKeyError",
    "RollbackRefusedError",
    "RootExpiredError",
    "RootInvalidError",
    "RuntimeIncompatibleError",
    "SelfTestError",
    "SignatureInvalidError",
    "SlowRetrievalError",
    "TargetingMismatchError",
    "TransportError",
    "UnknownPredictionError",
    "VersionRefusedError",
]


class IdentityError(AgentError):
    """The server refused this device's bootstrap token or credential (HTTP 401/403).

    Fatal until an operator acts (a new bootstrap token, or the device was revoked): retrying
    the same secret cannot help, so the agent reports it and stops asking.
    """
