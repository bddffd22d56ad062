"""Root metadata for devices and verifiers: public, unauthenticated, signed by the offline root.

Serving it needs no trust in the transport: every root is verified by the device against the
root it already trusts (contract.trust). ``/api/v1/signing-key`` (health.py) stays for tools
that only want the current online key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path

from server.api.deps import ServicesDep
from server.core.errors import NotFoundError

router = APIRouter(prefix="/api/v1/trust", tags=["trust"])
MAX_ROOT_VERSION = 1_000_000_000  # bound on the path parameter (a 4xx, never a 500)


@router.get("/roots")
def list_roots(services: ServicesDep) -> dict[str, Any]:
    """Every root envelope from version 1 to the newest, in order."""
    chain = services.signer.chain
    envelopes = list(chain.envelopes) if chain is not None else []
    return {"latest_version": len(envelopes), "roots": envelopes}


@router.get("/root/{version}")
def get_root(
    services: ServicesDep, version: int = Path(ge=1, le=MAX_ROOT_VERSION)
) -> dict[str, Any]:
    """One root envelope (SignedEnvelope wire form)."""
    chain = services.signer.chain
    env = chain.envelope(version) if chain is not None else None
    if env is None:
        raise NotFoundError(f"no root metadata version {version}")
    return env
