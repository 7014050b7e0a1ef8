"""Entry point for gunicorn's aiohttp workers, configured from the environment (``LLM_RELAY_*``, ``OPENAI_*``).

The module is also gunicorn's configuration file: it sets the worker class and the listen backlog::

    gunicorn --config python:server.gunicorn server.gunicorn:app --workers 4 --bind 127.0.0.1:8080

Without ``--config python:server.gunicorn`` pass ``--worker-class server.gunicorn_worker.RelayUVLoopWebWorker``
and ``--backlog``: aiohttp's own workers ignore gunicorn's backlog and listen with 128 (aio-libs/aiohttp#5283), which
a restart's reconnect storm overflows (server/backlog.py). The command line wins over this file.

Metrics (``--metrics``, on by default) are aggregated over the workers with prometheus-client's multiprocess mode:
this module points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory of its own unless the environment names one
(then its files are wiped at startup, as prometheus-client asks), before any worker imports prometheus-client;
``child_exit`` marks a dead worker's files, and the directory the module made is removed at exit.

The factory returns a runner rather than the app: aiohttp's worker then serves with the relay's own runner
settings (`server.app.runner_settings`: the request head timeout, the lingering time, the shutdown grace)
instead of gunicorn's ``--keep-alive``, ``--graceful-timeout`` and access log.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from .app import create_app, runner_settings
from .config import load_config
from .descriptors import install_accept_warning
from .gc_tuning import apply_after_startup
from .logs import configure_logging

_config = load_config([])

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_made_metrics_dir: str | None = None


def on_starting(server: Any) -> None:
    """gunicorn hook (arbiter, before the first worker): the multiprocess directory every worker inherits, its
    values from zero as prometheus-client asks. Nothing of the relay imports prometheus-client before
    `create_app` in a worker (server/metrics.py), which picks its multiprocess mode then."""
    global _made_metrics_dir
    if not _config.metrics:
        return
    directory = os.environ.get(_MULTIPROC_ENV)
    if not directory:
        _made_metrics_dir = os.environ[_MULTIPROC_ENV] = tempfile.mkdtemp(prefix="llm-relay-metrics-")
        return
    for stale in Path(directory).glob("*.db"):
        stale.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (arbiter): a worker exited; its live gauges no longer count."""
    if _config.metrics and os.environ.get(_MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """gunicorn hook (arbiter, last): remove the metrics directory this module made."""
    if _made_metrics_dir is not None:
        shutil.rmtree(_made_metrics_dir, ignore_errors=True)


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
    configure_logging(config.log_level, config.log_format)
    application = create_app(config)
    if config.gc_tuning:  # a worker process is the relay's own, like `python -m server`
        apply_after_startup(application)
    install_accept_warning(asyncio.get_running_loop())
    return web.AppRunner(application, **runner_settings(config))
