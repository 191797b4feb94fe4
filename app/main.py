"""``uvicorn app.main:app``: the API (``app.api``), built once from the environment's settings."""

from __future__ import annotations

from app.api import create_app

__all__ = ["app"]

app = create_app()
