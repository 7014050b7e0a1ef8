"""Entry point for gunicorn's aiohttp workers, configured from the environment (``LLM_RELAY_*``, ``OPENAI_*``):

gunicorn server.gunicorn:app --worker-class aiohttp.GunicornUVLoopWebWorker --workers 4 --bind 127.0.0.1:8080
"""

from __future__ import annotations

from aiohttp import web

from .app import create_app
from .config import load_config
from .gc_tuning import apply_after_startup


async def app() -> web.Application:
    """Each worker process builds its own app (and its own upstream client) after the fork."""
    config = load_config([])
    application = create_app(config)
    if config.gc_tuning:  # a worker process is the relay's own, like `python -m server`
        apply_after_startup(application)
    return application
