"""``python -m server``: run the relay. ``--help`` lists every option and its environment variable.

A startup error (a bad option value, a missing ``--api-keys-file``, a bad ``--redis-url``, a port in use) is one
line on stderr and exit status 2; the startup line is logged only once the server listens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence

from aiohttp import web

from .app import create_app, runner_settings
from .backlog import effective_backlog
from .config import Config, ConfigError, describe_source, load_config, startup_error
from .descriptors import install_accept_warning
from .gc_tuning import apply_after_startup
from .logs import configure_logging
from .metrics import MetricsListenerError
from .state import RELAY

log = logging.getLogger("llm_relay")


def _event_loop_factory(config: Config) -> None:
    if not config.use_uvloop:
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _reason(exc: OSError) -> str:
    """The system's own words for `exc`: uvloop's message repeats the address and errno around them."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(sys.argv[1:] if argv is None else argv)
    # Our own events at --log-level; libraries (httpx logs every upstream request at INFO) only when they warn.
    configure_logging(config.log_level, config.log_format)
    _event_loop_factory(config)
    try:
        app = create_app(config)
    except ConfigError as exc:
        startup_error(str(exc))
    if config.gc_tuning:
        apply_after_startup(app)
    backlog = effective_backlog(config.backlog, log)
    host = f"[{config.host}]" if ":" in config.host else config.host
    listening = False

    def listens(banner: str) -> None:
        # run_app calls its `print` once every site has started (aiohttp's "Running on ..." banner): the moment the
        # relay really serves, after any bind error. tests/test_process.py pins that order.
        nonlocal listening
        listening = True
        log.info("%s; listening on http://%s:%d/ (backlog %d)", describe_source(config), host, config.port, backlog)
        # An operator who reaches the relay by a name not listed sees why it answers 421.
        log.info("Host check: %s", app[RELAY].origin_policy.describe())
        if config.metrics:
            where = f"http://{config.metrics_host}:{config.metrics_port}" if config.metrics_port else "this listener"
            log.info("Prometheus metrics at GET /metrics on %s", where)

    loop = asyncio.new_event_loop()
    install_accept_warning(loop)
    try:
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            backlog=backlog,
            reuse_port=config.reuse_port or None,
            print=listens,
            loop=loop,
            **runner_settings(config),
        )
    except OSError as exc:
        if listening:
            raise
        if isinstance(exc, MetricsListenerError) and isinstance(exc.__cause__, OSError):
            startup_error(f"cannot listen on {exc.strerror}: {_reason(exc.__cause__)}")
        startup_error(f"cannot listen on {host}:{config.port}: {_reason(exc)}")


if __name__ == "__main__":
    main()
