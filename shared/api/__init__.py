"""The HTTP API (FastAPI). `function_app.py` wraps it for Azure Functions; `cli.py serve` runs it with uvicorn."""

from .app import app_from_environment, create_app

__all__ = ["app_from_environment", "create_app"]
