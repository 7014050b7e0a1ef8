"""The chat page."""

from __future__ import annotations

from aiohttp import web

from .config import Config


async def _index(request: web.Request) -> web.Response:
    return web.Response(text="<!doctype html><title>llm-relay</title><p>llm-relay", content_type="text/html")


def setup_page(app: web.Application, config: Config) -> None:
    app.router.add_get("/", _index)
