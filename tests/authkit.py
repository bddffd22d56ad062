"""Test-side identities: enroll devices and send each request with the right credential.

``FleetAuth`` is an ``httpx.Auth`` for a test client that plays both the operator and many
devices: a device route (``/devices/<id>/status|metrics|target``, ``/devices/register``, sample
uploads) is sent with that device's own credential once the device is enrolled; everything else
with the operator token. A request that already carries an ``Authorization`` header is left
alone, so a test can act as anyone on purpose (another device, a viewer, nobody).
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from typing import Any

import httpx

DEVICE_ROUTE = re.compile(r"^/api/v1/devices/([^/]+)/(status|metrics|target)$")


class FleetAuth(httpx.Auth):
    """Operator token by default; each enrolled device's credential on its own routes."""

    def __init__(self, operator_token: str) -> None:
        self.operator_token = operator_token
        self.devices: dict[str, str] = {}  # device_id -> credential
        self.bootstrap: str | None = None  # a multi-use enrollment token, made on first use

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if "authorization" not in request.headers:
            device = self._device_of(request)
            token = self.devices.get(device, self.operator_token) if device else None
            request.headers["Authorization"] = f"Bearer {token or self.operator_token}"
        yield request

    def _device_of(self, request: httpx.Request) -> str | None:
        path = request.url.path
        m = DEVICE_ROUTE.match(path)
        if m:
            return m.group(1)
        if request.method == "POST" and path in ("/api/v1/devices/register", "/api/v1/samples"):
            try:
                body = json.loads(request.content or b"null")
            except (UnicodeDecodeError, json.JSONDecodeError):
                return next(iter(self.devices), None)
            if isinstance(body, dict) and isinstance(body.get("device_id"), str):
                return str(body["device_id"])
            samples = body.get("samples") if isinstance(body, dict) else None
            if isinstance(samples, list) and samples and isinstance(samples[0], dict):
                did = samples[0].get("device_id")
                return did if isinstance(did, str) else None
            return next(iter(self.devices), None)
        return None


def bootstrap_token(client: httpx.Client | Any, *, max_uses: int = 100_000) -> str:
    """A multi-use enrollment token (made with the client's operator token)."""
    resp = client.post("/api/v1/enrollment-tokens", json={"max_uses": max_uses})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["token"])


def enroll(
    client: httpx.Client | Any,
    device_id: str,
    line: str,
    *,
    token: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Enroll ``device_id`` (or refresh it if this client already enrolled it); returns the
    device record. The credential lands in the client's FleetAuth when it has one."""
    auth = getattr(client, "auth", None)
    fleet = auth if isinstance(auth, FleetAuth) else None
    body = {"device_id": device_id, "model_line": line, **extra}
    if fleet is not None and device_id in fleet.devices:
        resp = client.post("/api/v1/devices/register", json=body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())
    if token is None:
        if fleet is not None:
            fleet.bootstrap = fleet.bootstrap or bootstrap_token(client)
            token = fleet.bootstrap
        else:
            token = bootstrap_token(client)
    resp = client.post("/api/v1/devices/enroll", json={"bootstrap_token": token, **body})
    assert resp.status_code == 201, resp.text
    out = resp.json()
    if fleet is not None:
        fleet.devices[device_id] = out["credential"]
    return {**out["device"], "credential": out["credential"]}
