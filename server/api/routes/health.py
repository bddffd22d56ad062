"""Liveness and the signing key's public half."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from server.api.deps import ServicesDep, read_sessions

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(services: ServicesDep) -> dict[str, Any]:
    with read_sessions(services)() as session:
        session.execute(text("SELECT 1"))
    bridge = services.bridge
    return {
        "status": "ok",
        "mqtt": None
        if bridge is None
        else {
            "connected": bridge.connected.is_set(),
            "pending": bridge.pending(),
            **asdict(bridge.stats),
        },
        "ingest": {"queued": services.ingest_queue.qsize(), **asdict(services.ingest.stats)},
    }


@router.get("/api/v1/signing-key")
def signing_key(services: ServicesDep) -> dict[str, str]:
    """The public key devices pin (distribute it out of band; this is for convenience)."""
    return {
        "key_id": services.signer.key_id,
        "public_key_pem": services.signer.public_pem().decode("ascii"),
    }
