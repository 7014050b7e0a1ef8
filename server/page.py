"""The chat page: ``GET /`` renders ``web/templates/index.html``; ``/static/`` serves ``web/static``.

The server hands its settings to the page's script as a JSON data block (``<script type="application/json">``),
never by pasting values into JavaScript: Jinja's ``tojson`` escapes ``<``, ``>``, ``&`` and ``'``, so no value
(a model name, an API base) can close the element or start markup. A data block is not script, so the
Content-Security-Policy can still forbid every inline script (``script-src 'self'``, no ``unsafe-eval``).

Static files are revalidated on every use (``no-cache`` with the ETag and Last-Modified aiohttp sends), except
when the URL carries the content hash the page links with (``?v=...``): those are immutable for a year.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp_jinja2
import jinja2
from aiohttp import hdrs, web
from yarl import URL

from .app import API_PREFIX
from .config import Config
from .errors import RelayError
from .handlers import check_host
from .request_origin import OriginPolicy
from .responses import error_response

__all__ = ["PAGE_TEMPLATES", "STATIC_ROUTE", "WEB_DIR", "PageSettings", "content_security_policy", "setup_page"]


def _find_web_dir() -> Path:
    # A source checkout (and an editable install) has web/ beside server/; a wheel installs it as data files
    # under <prefix>/share/llm-relay/web (setup.cfg [options.data_files]).
    beside = Path(__file__).resolve().parent.parent / "web"
    if beside.is_dir():
        return beside
    return Path(sys.prefix) / "share" / "llm-relay" / "web"


WEB_DIR: Final = _find_web_dir()
# Own keys and route name, so that mounting the page into a host app never clobbers the host's Jinja environment
# or its own "static" route.
PAGE_TEMPLATES: Final = web.AppKey("llm_relay_templates", jinja2.Environment)
STATIC_ROUTE: Final = "llm_relay_static"

_REVALIDATE: Final = "no-cache"
_IMMUTABLE: Final = "public, max-age=31536000, immutable"


@dataclass(frozen=True, slots=True)
class PageSettings:
    """What the page's script needs from the server: where the API is and what it will answer with."""

    api_base: str
    model: str
    demo: bool
    max_message_chars: int
    max_messages: int

    @classmethod
    def from_config(cls, config: Config, api_base: str = API_PREFIX) -> PageSettings:
        return cls(
            api_base=api_base.rstrip("/"),
            model=config.resolved_model,
            demo=config.resolved_provider == "demo",
            max_message_chars=config.max_message_chars,
            max_messages=config.max_messages,
        )

    def as_json(self) -> dict[str, object]:
        return {
            "apiBase": self.api_base,
            "model": self.model,
            "demo": self.demo,
            "maxMessageChars": self.max_message_chars,
            "maxMessages": self.max_messages,
        }


def content_security_policy(api_base: str) -> str:
    """The page's CSP (https://www.w3.org/TR/CSP3/): our own files only, and the API's origin when it is remote."""
    connect = "'self'"
    api = URL(api_base)
    if api.absolute:
        connect += f" {api.origin()}"
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {connect}",
            "base-uri 'none'",
            # The form is only ever sent by the script; a native submission (script failed to load) goes nowhere.
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def _page_headers(api_base: str) -> Mapping[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(api_base),
        "X-Content-Type-Options": "nosniff",
        # Not "no-referrer": with it, a same-origin POST carries "Origin: null" (Fetch §3.1 "append a request
        # Origin header"), which check_origin refuses when the browser sends no Fetch Metadata (older browsers,
        # plain http to a host name). "same-origin" keeps the real Origin everywhere.
        "Referrer-Policy": "same-origin",
        # The settings in the page change when the server restarts with other options.
        "Cache-Control": "no-cache",
    }


def _page_handler(settings: PageSettings, policy: OriginPolicy) -> Callable[[web.Request], Awaitable[web.Response]]:
    headers = _page_headers(settings.api_base)
    context = {"settings": settings.as_json(), "model": settings.model, "demo": settings.demo}

    async def page(request: web.Request) -> web.Response:
        try:
            # Under another name (DNS rebinding), the page would run as that name's origin, with the API its own.
            check_host(request, policy)
        except RelayError as error:
            return error_response(error)
        response = aiohttp_jinja2.render_template("index.html", request, context, app_key=PAGE_TEMPLATES)
        response.headers.update(headers)
        return response

    return page


class _StaticCacheHook:
    """``on_response_prepare``: cache headers for the responses of one static resource, left alone elsewhere."""

    def __init__(self, resource: web.StaticResource) -> None:
        self.resource = resource

    async def __call__(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.match_info.route.resource is not self.resource or response.status not in {200, 304}:
            return
        response.headers[hdrs.CACHE_CONTROL] = _IMMUTABLE if self._current_version(request) else _REVALIDATE
        response.headers["X-Content-Type-Options"] = "nosniff"

    def _current_version(self, request: web.Request) -> bool:
        """True if the URL names the file's current content hash (an old hash must not pin new content)."""
        version = request.query.get("v")
        if not version:
            return False
        try:
            current = self.resource.url_for(filename=request.match_info["filename"], append_version=True)
        except ValueError:
            return False
        return current.query.get("v") == version


def setup_page(
    app: web.Application, config: Config, *, api_base: str = API_PREFIX, web_dir: Path = WEB_DIR
) -> PageSettings:
    """Serve the chat page at ``/`` and its files at ``/static/``; the page talks to the API at `api_base`,
    which may be another origin (``http://api.example:8080/api``) that lists this page's origin in
    ``--cors-origin``."""
    settings = PageSettings.from_config(config, api_base)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(web_dir / "templates"),
        app_key=PAGE_TEMPLATES,
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    policy = OriginPolicy.from_settings(config.public_origins, config.cors_origins)
    app.router.add_get("/", _page_handler(settings, policy), name="llm_relay_page")
    static = app.router.add_static("/static/", web_dir / "static", name=STATIC_ROUTE, append_version=True)
    assert isinstance(static, web.StaticResource)
    app.on_response_prepare.append(_StaticCacheHook(static))
    return settings
