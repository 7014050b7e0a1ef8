"""Entry point for gunicorn's aiohttp workers, configured from the environment (``LLM_RELAY_*``, ``OPENAI_*``):

gunicorn server.gunicorn:app --worker-class aiohttp.GunicornUVLoopWebWorker --workers 4 --bind 127.0.0.1:8080

The factory returns a runner rather than the app: aiohttp's worker then serves with the relay's own runner
settings (`server.app.runner_settings`: the request head timeout, the lingering time, the shutdown grace)
instead of gunicorn's ``--keep-alive``, ``--graceful-timeout`` and access log.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .app import create_app, runner_settings
from .config import load_config
from .descriptors import install_accept_warning
from .gc_tuning import apply_after_startup


async def app() -> web.AppRunner:
    """Each worker process builds its own app (and its own upstream client) after the fork."""
    config = load_config([])
    application = create_app(config)
    if config.gc_tuning:  # a worker process is the relay's own, like `python -m server`
        apply_after_startup(application)
    install_accept_warning(asyncio.get_running_loop())
    return web.AppRunner(application, **runner_settings(config))
