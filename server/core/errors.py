"""The server's one exception family.

Exception tree::

    EdgeloopError                 (root; carries the HTTP status it maps to)
    ├── ConfigError               (settings or key material unusable; fatal at startup)
    │   └── SchemaError           (the database's schema is not this edgeloop's: db upgrade)
    ├── NotFoundError             (404: the named thing does not exist)
    │   └── ArtifactNotFoundError (no object under that sha256 in the artifact store)
    ├── AuthenticationError       (401: no credential, or an unknown one)
    ├── ForbiddenError            (403: known caller, not allowed: role, other device, revoked)
    ├── ConflictError             (409: the request clashes with the current state)
    ├── InvalidRequestError       (422: the request is well-formed JSON but not acceptable)
    ├── PayloadTooLargeError      (413: the request body is over its limit)
    ├── UnavailableError          (503, transient: a queue is full or a dependency is down)
    │   └── ArtifactStoreUnavailableError (the object store failed or refused a request)
    ├── RateLimitedError          (429, transient: over a rate limit or quota; Retry-After)
    ├── ArtifactError             (stored bytes do not match their hash)
    └── TrainingError             (a training run crashed or wrote no usable output)

Foreign errors (SQLAlchemy, paho, contract) are translated at the boundary with
``raise XError(...) from exc`` so callers see one family.
"""

from __future__ import annotations


class EdgeloopError(Exception):
    """Root of every error the server raises on purpose."""

    status_code: int = 500
    transient: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(EdgeloopError):
    """Settings or key material are unusable; the server refuses to start."""


class SchemaError(ConfigError):
    """The database's schema is not the one this edgeloop needs (empty, made before migrations,
    behind, or newer); the server refuses to start, ``edgeloop db upgrade`` fixes all but newer."""


class NotFoundError(EdgeloopError):
    status_code = 404


class ConflictError(EdgeloopError):
    status_code = 409


class InvalidRequestError(EdgeloopError):
    status_code = 422


class PayloadTooLargeError(EdgeloopError):
    status_code = 413


class UnavailableError(EdgeloopError):
    status_code = 503
    transient = True


class ArtifactError(EdgeloopError):
    """Bytes in the artifact store (or offered to it) do not match their sha256."""


class ArtifactNotFoundError(NotFoundError):
    """The artifact store holds no object under the sha256 asked for."""


class ArtifactStoreUnavailableError(UnavailableError):
    """The artifact store's backend (an object store over HTTP) failed or refused a request."""


class TrainingError(EdgeloopError):
    """A training subprocess crashed or left no usable report."""


class AuthenticationError(EdgeloopError):
    """401: no credential, or one the server does not know (or no longer honours)."""

    status_code = 401


class ForbiddenError(EdgeloopError):
    """403: the caller is known but may not do this (role too low, another device, revoked)."""

    status_code = 403


class RateLimitedError(EdgeloopError):
    """429: the caller is over a rate limit or quota; retry after ``retry_after_s`` seconds."""

    status_code = 429
    transient = True

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))
