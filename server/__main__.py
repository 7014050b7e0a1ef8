"""``python -m server``: run the relay. ``--help`` lists every option and its environment variable."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from .app import create_app, runner_settings
from .config import Config, load_config
from .descriptors import install_accept_warning
from .gc_tuning import apply_after_startup


def _event_loop_factory(config: Config) -> None:
    if not config.use_uvloop:
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(sys.argv[1:] if argv is None else argv)
    # Our own events at INFO; libraries (httpx logs every upstream request at INFO) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llm_relay").setLevel(logging.INFO)
    _event_loop_factory(config)
    provider = config.resolved_provider
    where = "the built-in demo model (simulated replies)" if provider == "demo" else "an OpenAI-compatible upstream"
    logging.getLogger("llm_relay").info(
        "relaying %s as model %s on http://%s:%d/", where, config.resolved_model, config.host, config.port
    )
    app = create_app(config)
    if config.gc_tuning:
        apply_after_startup(app)
    loop = asyncio.new_event_loop()
    install_accept_warning(loop)
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        reuse_port=config.reuse_port or None,
        print=None,
        loop=loop,
        **runner_settings(config),
    )


if __name__ == "__main__":
    main()
