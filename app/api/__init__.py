"""The HTTP side only: FastAPI app, routes, request and response models, access rules.

Talks to Redis through the job protocol (``app.jobs``); never imported by the workers.
"""

from app.api.app import create_app

__all__ = [
    "create_app",
]
