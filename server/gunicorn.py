"""Entry point for gunicorn's aiohttp workers, configured from the environment (``LLM_RELAY_*``, ``OPENAI_*``).

The module is also gunicorn's configuration file: it sets the worker class and the listen backlog::

    gunicorn --config python:server.gunicorn server.gunicorn:app --workers 4 --bind 127.0.0.1:8080

Without ``--config python:server.gunicorn`` pass ``--worker-class server.gunicorn_worker.RelayUVLoopWebWorker``
and ``--backlog``: aiohttp's own workers ignore gunicorn's backlog and listen with 128 (aio-libs/aiohttp#5283), which
a restart's reconnect storm overflows (server/backlog.py). The command line wins over this file.

The factory returns a runner rather than the app: aiohttp's worker then serves with the relay's own runner
settings (`server.app.runner_settings`: the request head timeout, the lingering time, the shutdown grace)
instead of gunicorn's ``--keep-alive``, ``--graceful-timeout`` and access log.
"""

from __future__ import annotations

import asyncio
import importlib.util

from aiohttp import web

from .app import create_app, runner_settings
from .config import load_config
from .descriptors import install_accept_warning
from .gc_tuning import apply_after_startup

_config = load_config([])

# gunicorn settings, read when this module is gunicorn's --config. The worker applies `backlog` after aiohttp's
# worker has listened with its own default (server/gunicorn_worker.py); gunicorn's default is 2048.
backlog = _config.backlog
worker_class = (
    "server.gunicorn_worker.RelayUVLoopWebWorker"
    if _config.use_uvloop and importlib.util.find_spec("uvloop") is not None
    else "server.gunicorn_worker.RelayWebWorker"
)


async def app() -> web.AppRunner:
    """Each worker process builds its own app (and its own upstream client) after the fork."""
    config = load_config([])
    application = create_app(config)
    if config.gc_tuning:  # a worker process is the relay's own, like `python -m server`
        apply_after_startup(application)
    install_accept_warning(asyncio.get_running_loop())
    return web.AppRunner(application, **runner_settings(config))
