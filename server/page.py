"""The chat page: ``GET /`` renders ``web/templates/index.html``; ``/static/`` serves ``web/static``.

The page's files are package data: the repository's top-level ``web/`` is shipped inside the package as
``server/web`` (setup.cfg maps it with ``package_dir``) and found with `importlib.resources`, so they are there
whatever the install layout (a venv, ``pip install --user`` or ``--target``, a zip on ``sys.path``); a source
checkout, where the mapping has not happened, reads ``web/`` beside ``server/``. Templates are read through the
`Traversable` itself; static files are served by aiohttp from a directory, so a zipped install copies them to a
temporary one, removed when the app is cleaned up.

The server hands its settings to the page's script as a JSON data block (``<script type="application/json">``),
never by pasting values into JavaScript: Jinja's ``tojson`` escapes ``<``, ``>``, ``&`` and ``'``, so no value
(a model name, an API base) can close the element or start markup. A data block is not script, so the
Content-Security-Policy can still forbid every inline script (``script-src 'self'``, no ``unsafe-eval``).

Static files are revalidated on every use (``no-cache`` with the ETag and Last-Modified aiohttp sends), except
when the URL carries the content hash the page links with (``?v=...``): those are immutable for a year.
"""

from __future__ import annotations

import importlib.resources
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
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

__all__ = [
    "PAGE_TEMPLATES",
    "STATIC_ROUTE",
    "WEB_DIR",
    "PageSettings",
    "content_security_policy",
    "setup_page",
    "web_files",
]


def web_files() -> Traversable:
    """The page's files: ``server/web`` in an installed package, else the source checkout's ``web/``."""
    packaged = importlib.resources.files(__package__ or "server") / "web"
    if packaged.is_dir():
        return packaged
    # A source checkout, or an editable install of one (its finder maps modules, not this folder).
    return Path(__file__).resolve().parent.parent / "web"


WEB_DIR: Final = web_files()
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
    # With --api-keys-file the page asks for a key and sends it in the Authorization header of every request.
    auth_required: bool = False

    @classmethod
    def from_config(cls, config: Config, api_base: str = API_PREFIX) -> PageSettings:
        return cls(
            api_base=api_base.rstrip("/"),
            model=config.resolved_model,
            demo=config.resolved_provider == "demo",
            max_message_chars=config.max_message_chars,
            max_messages=config.max_messages,
            auth_required=config.api_keys_file is not None,
        )

    def as_json(self) -> dict[str, object]:
        return {
            "apiBase": self.api_base,
            "model": self.model,
            "demo": self.demo,
            "maxMessageChars": self.max_message_chars,
            "maxMessages": self.max_messages,
            "authRequired": self.auth_required,
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


class _TraversableLoader(jinja2.BaseLoader):
    """Templates read from a `Traversable` (a folder or a zip): ``jinja2.FileSystemLoader`` needs a real path."""

    def __init__(self, root: Traversable) -> None:
        self.root = root

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, Callable[[], bool]]:
        path = self.root
        for part in template.split("/"):
            if part in {"", ".", ".."}:
                raise jinja2.TemplateNotFound(template)
            path = path / part
        if not path.is_file():
            raise jinja2.TemplateNotFound(template)
        # Package data does not change under a running server: never re-read.
        return path.read_text(encoding="utf-8"), str(path), lambda: True


def _copy_tree(source: Traversable, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())


def _static_dir(app: web.Application, static: Traversable) -> Path:
    """`static` as a directory aiohttp can serve: itself when it is one, else a temporary copy (a zipped
    install; ``importlib.resources.as_file`` takes a directory only from Python 3.12)."""
    if isinstance(static, Path):
        return static
    copy = Path(tempfile.mkdtemp(prefix="llm-relay-static-"))
    _copy_tree(static, copy)

    async def remove_copy(app: web.Application) -> AsyncIterator[None]:
        yield
        shutil.rmtree(copy, ignore_errors=True)

    app.cleanup_ctx.append(remove_copy)
    return copy


def setup_page(
    app: web.Application, config: Config, *, api_base: str = API_PREFIX, web_dir: Traversable = WEB_DIR
) -> PageSettings:
    """Serve the chat page at ``/`` and its files at ``/static/``; the page talks to the API at `api_base`,
    which may be another origin (``http://api.example:8080/api``) that lists this page's origin in
    ``--cors-origin``."""
    settings = PageSettings.from_config(config, api_base)
    aiohttp_jinja2.setup(
        app,
        loader=_TraversableLoader(web_dir / "templates"),
        app_key=PAGE_TEMPLATES,
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    policy = OriginPolicy.from_settings(config.public_origins, config.cors_origins)
    app.router.add_get("/", _page_handler(settings, policy), name="llm_relay_page")
    static_dir = _static_dir(app, web_dir / "static")
    static = app.router.add_static("/static/", static_dir, name=STATIC_ROUTE, append_version=True)
    assert isinstance(static, web.StaticResource)
    app.on_response_prepare.append(_StaticCacheHook(static))
    return settings
