"""The chat page over real sockets: rendering, the injected settings, security headers, static files and CORS."""

from __future__ import annotations

import asyncio
import json
import re
import zipfile
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import aiohttp_cors
import pytest
from aiohttp import web
from markupsafe import escape

from server.app import create_app, setup
from server.config import Config
from server.page import STATIC_ROUTE, WEB_DIR, PageSettings, content_security_policy, setup_page

from .conftest import ServeApp
from .wire import sse_events

FAST = Config(provider="demo", demo_delay=0.0, limits_enabled=False, heartbeat=0.0)
ALLOWED = "http://allowed.example:3000"
FOREIGN = "http://evil.example"


class _Scripts(HTMLParser):
    """The <script> elements of a page: (attributes, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._open: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self._open, self._text = dict(attrs), []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._open is not None:
            self.scripts.append((self._open, "".join(self._text)))
            self._open = None


def scripts_of(html: str) -> list[tuple[dict[str, str | None], str]]:
    parser = _Scripts()
    parser.feed(html)
    parser.close()
    return parser.scripts


def settings_of(html: str) -> dict[str, object]:
    blocks = [text for attrs, text in scripts_of(html) if attrs.get("id") == "relay-settings"]
    assert len(blocks) == 1
    value = json.loads(blocks[0])
    assert isinstance(value, dict)
    return value


def csp_directives(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


async def fetch_page(http: aiohttp.ClientSession, base: str) -> tuple[aiohttp.ClientResponse, str]:
    async with http.get(f"{base}/") as resp:
        return resp, await resp.text()


@pytest.fixture
async def base(serve: ServeApp) -> str:
    return await serve(create_app(FAST))


# -- the page ----------------------------------------------------------------------------------------------------


async def test_page_renders_with_settings_and_assets(base: str, http: aiohttp.ClientSession) -> None:
    resp, html = await fetch_page(http, base)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert settings_of(html) == {
        "apiBase": "/api",
        "model": "llm-relay-demo",
        "demo": True,
        "maxMessageChars": 32_000,
        "maxMessages": 200,
        "authRequired": False,
    }
    modules = [attrs for attrs, _ in scripts_of(html) if attrs.get("type") == "module"]
    assert len(modules) == 1
    assert re.fullmatch(r"/static/app\.js\?v=[\w%-]+", modules[0]["src"] or "")
    assert re.search(r'<link rel="stylesheet" href="/static/style\.css\?v=[\w%-]+">', html)
    # Every script is either our module file or a JSON data block: nothing inline runs.
    assert all(attrs.get("src") or attrs.get("type") == "application/json" for attrs, _ in scripts_of(html))
    assert '<code id="model-name">llm-relay-demo</code>' in html
    assert "demo · simulated" in html
    for needed in ('id="prompt"', 'id="send"', 'id="stop"', 'id="transcript"', 'aria-live="polite"', 'for="prompt"'):
        assert needed in html


async def test_page_for_an_upstream_model_has_no_demo_badge(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    config = Config(provider="openai", api_key="sk-test", model="gpt-4o-mini", limits_enabled=False)
    base = await serve(create_app(config))
    _, html = await fetch_page(http, base)
    assert settings_of(html)["demo"] is False
    assert settings_of(html)["model"] == "gpt-4o-mini"
    assert "demo · simulated" not in html


@pytest.mark.parametrize(
    "model",
    [
        "</script><script>alert(1)</script>",
        "<!--<script>",
        "a'b\"c&d",
        "\u2028\u2029 line separators",
    ],
    ids=["closing-script-tag", "comment-open", "quotes-and-ampersand", "js-line-separators"],
)
async def test_settings_are_escaped_json(serve: ServeApp, http: aiohttp.ClientSession, model: str) -> None:
    base = await serve(create_app(FAST.with_changes(model=model)))
    _, html = await fetch_page(http, base)
    assert settings_of(html)["model"] == model
    (block,) = [text for attrs, text in scripts_of(html) if attrs.get("id") == "relay-settings"]
    assert "<" not in block
    assert ">" not in block
    assert "&" not in block
    assert "alert(1)</script>" not in html
    # In the markup the name is escaped by Jinja's autoescape.
    assert f'<code id="model-name">{escape(model)}</code>' in html


async def test_page_security_headers(base: str, http: aiohttp.ClientSession) -> None:
    resp, _ = await fetch_page(http, base)
    csp = csp_directives(resp.headers["Content-Security-Policy"])
    assert csp["script-src"] == ["'self'"]
    assert csp["default-src"] == ["'none'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert not any("unsafe" in value for values in csp.values() for value in values)
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # Not no-referrer: that would make a same-origin POST carry "Origin: null", which the API refuses.
    assert resp.headers["Referrer-Policy"] == "same-origin"


def test_csp_allows_a_remote_api_origin() -> None:
    csp = csp_directives(content_security_policy("http://api.example:8080/api"))
    assert csp["connect-src"] == ["'self'", "http://api.example:8080"]
    assert csp["script-src"] == ["'self'"]
    assert csp_directives(content_security_policy("/relay/api"))["connect-src"] == ["'self'"]


async def test_page_in_a_host_app_with_another_api_base(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    host = web.Application()
    settings = setup_page(host, FAST, api_base="http://api.example:8080/api/")
    assert settings == PageSettings.from_config(FAST, "http://api.example:8080/api")
    base = await serve(host)
    resp, html = await fetch_page(http, base)
    assert settings_of(html)["apiBase"] == "http://api.example:8080/api"
    assert "http://api.example:8080" in csp_directives(resp.headers["Content-Security-Policy"])["connect-src"]


async def test_page_answers_head(base: str, http: aiohttp.ClientSession) -> None:
    async with http.head(f"{base}/") as resp:
        assert resp.status == 200
        assert "Content-Security-Policy" in resp.headers


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("relay.test:{port}", 200), ("evil.example:{port}", 421),
     ("relay.test.evil.example", 421)],
    ids=["address", "localhost", "listed-name", "rebinding", "listed-as-prefix"],
)  # fmt: skip
async def test_page_is_served_only_for_the_relays_own_names(
    serve: ServeApp, http: aiohttp.ClientSession, host: str, status: int
) -> None:
    base = await serve(create_app(FAST.with_changes(public_origins=("http://relay.test",))))
    async with http.get(f"{base}/", headers={"Host": host.format(port=base.rsplit(":", 1)[1])}) as resp:
        assert resp.status == status
        if status == 200:
            assert settings_of(await resp.text())["apiBase"] == "/api"
        else:
            assert resp.content_type == "application/json"
            assert (await resp.json())["error"]["type"] == "misdirected_request"
            assert "Content-Security-Policy" not in resp.headers


async def test_page_mounted_in_a_host_app_checks_the_host_too(serve: ServeApp, http: aiohttp.ClientSession) -> None:
    host = web.Application()
    setup_page(host, FAST)
    base = await serve(host)
    async with http.get(f"{base}/") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/", headers={"Host": "evil.example"}) as resp:
        assert resp.status == 421


# -- static files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", {"text/javascript", "application/javascript"}),
        ("ndjson.js", {"text/javascript", "application/javascript"}),
        ("style.css", {"text/css"}),
    ],
    ids=["app", "ndjson", "style"],
)
async def test_static_files_are_served_and_revalidated(
    base: str, http: aiohttp.ClientSession, name: str, content_type: set[str]
) -> None:
    async with http.get(f"{base}/static/{name}") as resp:
        assert resp.status == 200
        # A module script is refused by browsers unless its type is a JavaScript MIME type.
        assert resp.content_type in content_type
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert await resp.read() == (WEB_DIR / "static" / name).read_bytes()
        etag = resp.headers["ETag"]
    async with http.get(f"{base}/static/{name}", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
        assert resp.headers["Cache-Control"] == "no-cache"


async def test_versioned_static_urls_are_immutable(base: str, http: aiohttp.ClientSession) -> None:
    _, html = await fetch_page(http, base)
    match = re.search(r'src="(/static/app\.js\?v=[\w%-]+)"', html)
    assert match
    async with http.get(base + match.group(1)) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    # An old hash must not pin today's content for a year.
    async with http.get(f"{base}/static/app.js?v=0123456789abcdef") as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    "path",
    ["/static/missing.js", "/static/../server/config.py", "/static/%2e%2e/server/config.py", "/static/"],
    ids=["missing", "dot-dot", "encoded-dot-dot", "directory"],
)
async def test_static_serves_nothing_outside_web_static(base: str, http: aiohttp.ClientSession, path: str) -> None:
    async with http.get(base + path) as resp:
        assert resp.status in {403, 404}
        assert "Cache-Control" not in resp.headers
        assert b"DEMO_MODEL" not in await resp.read()


def test_no_script_turns_model_output_into_markup() -> None:
    # The browser tests prove it for the paths they drive; this keeps every other path honest.
    for name in ("app.js", "ndjson.js"):
        source = (WEB_DIR / "static" / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"{name} uses {sink}"


def _zip_web_as_installed(archive: Path) -> None:
    """The checkout's web/ in a zip, where a wheel has it: server/web/."""
    web_dir = Path(str(WEB_DIR))
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in web_dir.rglob("*"):
            if path.is_file():
                zipped.write(path, f"server/web/{path.relative_to(web_dir).as_posix()}")


async def test_page_files_in_a_zip_are_served_and_their_copy_removed(tmp_path: Path) -> None:
    # A zipped install (the wheel itself on sys.path): the templates are read from the zip, the static files from
    # a temporary copy that the app's cleanup removes. tests/test_install.py runs a real zipped install.
    archive = tmp_path / "web.zip"
    await asyncio.to_thread(_zip_web_as_installed, archive)
    with zipfile.ZipFile(archive) as zipped:
        app = web.Application()
        setup_page(app, FAST, web_dir=zipfile.Path(zipped, "server/web/"))
        copy = Path(app.router[STATIC_ROUTE].get_info()["directory"])
        assert await asyncio.to_thread(copy.is_dir)
        assert not copy.is_relative_to(tmp_path)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession() as http:
                resp, html = await fetch_page(http, f"http://{host}:{port}")
                assert resp.status == 200
                assert settings_of(html)["apiBase"] == "/api"
                async with http.get(f"http://{host}:{port}/static/app.js") as static:
                    assert await static.read() == (WEB_DIR / "static" / "app.js").read_bytes()
        finally:
            await runner.cleanup()
    assert not await asyncio.to_thread(copy.exists)


def test_web_dir_is_the_repository_web_folder() -> None:
    assert Path(__file__).resolve().parent.parent / "web" == WEB_DIR
    assert (WEB_DIR / "templates" / "index.html").is_file()


# -- CORS --------------------------------------------------------------------------------------------------------


@pytest.fixture
async def cors_base(serve: ServeApp) -> str:
    return await serve(create_app(FAST.with_changes(cors_origins=(ALLOWED,))))


def assert_no_cors(headers: Mapping[str, str]) -> None:
    assert not [name for name in headers if name.lower().startswith("access-control-")]


async def test_cors_allowed_origin_get(cors_base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{cors_base}/api/chat", params={"prompt": "hi"}, headers={"Origin": ALLOWED}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "Access-Control-Allow-Credentials" not in resp.headers
        exposed = {h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"x-stream-id", "retry-after"} <= exposed
        assert b"event: done" in await resp.read()


async def test_cors_preflight_for_the_json_post(cors_base: str, http: aiohttp.ClientSession) -> None:
    preflight = {
        "Origin": ALLOWED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(f"{cors_base}/api/chat", headers=preflight) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "Access-Control-Allow-Credentials" not in resp.headers
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
    headers = {"Origin": ALLOWED, "Accept": "application/x-ndjson"}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{cors_base}/api/chat", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert (await resp.read()).endswith(b"}\n")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_cors_preflight_allows_the_headers_sdks_send(
    cors_base: str, http: aiohttp.ClientSession, path: str
) -> None:
    # What the openai JS SDK's preflight names (its X-Stainless-* telemetry goes with every request).
    requested = "authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-retry-count"
    preflight = {
        "Origin": ALLOWED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": requested,
    }
    async with http.options(f"{cors_base}{path}", headers=preflight) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "Access-Control-Allow-Credentials" not in resp.headers
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed == {h.strip() for h in requested.split(",")}


async def test_cors_foreign_origin_is_refused_without_cors_headers(cors_base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{cors_base}/api/chat", params={"prompt": "hi"}, headers={"Origin": FOREIGN}) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "forbidden"
        assert_no_cors(resp.headers)
    headers = {"Origin": FOREIGN, "Accept": "application/x-ndjson"}
    async with http.post(f"{cors_base}/api/chat", json={"prompt": "hi"}, headers=headers) as resp:
        assert resp.status == 403
        assert_no_cors(resp.headers)
    preflight = {
        "Origin": FOREIGN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(f"{cors_base}/api/chat", headers=preflight) as resp:
        assert resp.status == 403
        assert_no_cors(resp.headers)
        assert (await resp.json())["error"]["type"] == "forbidden"
    async with http.options(f"{cors_base}/v1/chat/completions", headers=preflight) as resp:
        assert resp.status == 403
        assert_no_cors(resp.headers)
        assert (await resp.json())["error"]["type"] == "permission_error"  # OpenAI's dialect under /v1


async def test_without_cors_origins_only_the_same_origin_may_call(base: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}, headers={"Origin": ALLOWED}) as resp:
        assert resp.status == 403
        assert_no_cors(resp.headers)
    # The page's own origin (what a browser sends with the page's POST) is always allowed, without CORS headers.
    async with http.post(
        f"{base}/api/chat", json={"prompt": "hi"}, headers={"Origin": base, "Accept": "application/x-ndjson"}
    ) as resp:
        assert resp.status == 200
        assert_no_cors(resp.headers)
        await resp.read()


async def test_with_cors_other_methods_still_get_a_json_405_naming_options(
    cors_base: str, http: aiohttp.ClientSession
) -> None:
    # The 405 route is added after CORS's preflight route: the preflight still works (above), and Allow names it.
    async with http.put(f"{cors_base}/api/chat", headers={"Origin": ALLOWED}) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET,OPTIONS,POST"
        assert (await resp.json())["error"]["type"] == "method_not_allowed"


async def test_a_host_that_adds_cors_to_all_its_routes_can_embed_the_api(
    serve: ServeApp, http: aiohttp.ClientSession
) -> None:
    # aiohttp-cors' own recipe, `for route in app.router.routes(): cors.add(route)`, reaches the mounted API's
    # routes too: they must be ones it accepts (aiohttp-cors refuses a route for every method, "*").
    host = web.Application()
    setup(host, FAST.with_changes(cors_origins=()))
    cors = aiohttp_cors.setup(host, defaults={ALLOWED: aiohttp_cors.ResourceOptions()})  # type: ignore[no-untyped-call]
    for route in list(host.router.routes()):
        cors.add(route)
    base = await serve(host)
    async with http.get(f"{base}/api/chat", params={"prompt": "hi"}) as resp:
        assert resp.status == 200
        assert sse_events(await resp.read())[-1][0] == "done"
    async with http.put(f"{base}/api/chat") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["type"] == "method_not_allowed"
