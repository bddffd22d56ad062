"""Application factory, lifespan and the ``edgeloop-server`` entry point."""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.metrics import make_registry
from server.api.routes import (
    alerts,
    artifacts,
    audit,
    auth,
    broker,
    devices,
    health,
    labels,
    lineage,
    models,
    monitoring,
    observability,
    rollouts,
    samples,
    training,
    trust,
    ui,
)
from server.core.config import DEV_ADMIN_TOKEN, Settings
from server.core.errors import ConfigError, EdgeloopError, RateLimitedError
from server.services import Services, build_services

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """Refuse bodies whose declared Content-Length is over the limit before reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and (
                    not value.isdigit() or int(value) > self.max_bytes
                ):
                    response = JSONResponse(
                        {"detail": f"request body over {self.max_bytes} bytes"}, status_code=413
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(settings: Settings, *, services: Services | None = None) -> FastAPI:
    """Build the API. Background threads start in the lifespan (``with TestClient(app)``)."""
    if not settings.effective_admin_token or (
        settings.environment == "production" and settings.admin_token == DEV_ADMIN_TOKEN
    ):
        raise ConfigError("production needs EDGELOOP_ADMIN_TOKEN (the bootstrap admin token)")
    services = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            services.stop()

    app = FastAPI(title="edgeloop", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)

    @app.exception_handler(EdgeloopError)
    async def _edgeloop_error(_r: Request, exc: EdgeloopError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimitedError):
            headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        # Echo location and message only: the offending input may be huge or not JSON-safe
        # (NaN), and rendering it must never turn a 422 into a 500.
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(IntegrityError)
    async def _integrity(_r: Request, exc: IntegrityError) -> JSONResponse:
        log.info("integrity conflict: %s", exc.orig)
        return JSONResponse({"detail": "conflicts with stored data; retry"}, status_code=409)

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database unavailable (%s %s): %s", request.method, request.url.path, exc.orig)
        return JSONResponse({"detail": "database unavailable; retry"}, status_code=503)

    for module in (
        health,
        auth,  # before devices: POST /devices/enroll and /devices/{id}/revoke
        devices,
        samples,
        labels,
        models,
        artifacts,
        training,
        rollouts,
        alerts,
        monitoring,
        observability,
        ui,
        lineage,
        trust,
        audit,
        broker,
    ):
        app.include_router(module.router)
    ui.mount(app)
    app.state.metrics_registry = make_registry(services)
    return app


SERVER_HELP = """\
Run the edgeloop server: the API, the dashboard, the MQTT bridge, the rollout engine and the
registrar of trained models (registers, signs, rolls out), in one process. Training runs in
workers (`edgeloop worker`, on any machine); in development the server also runs one itself
(EDGELOOP_EMBEDDED_WORKER, default: on in development, off in production).

Every setting comes from an EDGELOOP_* environment variable (the list below, with defaults);
--host and --port override EDGELOOP_HOST and EDGELOOP_PORT. In development a missing signing
key, root and database are created under EDGELOOP_DATA_DIR (./var) on start; in production
(EDGELOOP_ENVIRONMENT=production) the server refuses development secrets. The operator's
command line is `edgeloop` (`edgeloop --help`)."""


def _settings_epilog() -> str:
    lines = ["environment (default):"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None or default == "" else f" ({default})"
        lines.append(f"  EDGELOOP_{name.upper()}{shown}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    """Entry point ``edgeloop-server``: settings from EDGELOOP_* and uvicorn. ``--help`` prints
    help and exits before anything is read or written."""
    parser = argparse.ArgumentParser(
        prog="edgeloop-server",
        description=SERVER_HELP,
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="address to listen on (EDGELOOP_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (EDGELOOP_PORT)")
    args = parser.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        # Fatal and the operator's to fix (a setting, a key, the schema): the message, no trace.
        log.error("edgeloop-server refuses to start: %s", exc.message)
        raise SystemExit(2) from exc
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    run()
