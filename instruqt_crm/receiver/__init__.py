"""The web process: the signed-webhook receiver, health checks and the operator pages."""

from .app import create_app

__all__ = ["create_app"]
