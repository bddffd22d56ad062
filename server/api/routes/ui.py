"""The operator dashboard: static files that call the same public API as the CLI."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


def mount(app) -> None:  # type: ignore[no-untyped-def]
    app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
