"""Build the relay: a standalone app (`create_app`) or routes mounted into an existing aiohttp app (`setup`).

The streaming API is its own sub-application, so its middleware (JSON errors), CORS rules and state never touch
the host's routes; the host keeps its runner settings (``handler_cancellation`` included) and the relay still
notices disconnects on its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp_cors
from aiohttp import web

from .admission import Limiter, NoLimits
from .budget_backends import KeyBudget, TokenBudgets, build_budgets
from .chat_request import RequestRules
from .client_key import ClientIdentifier
from .config import DEMO_MODEL, Config
from .errors import RelayError
from .generation import GenerationSettings
from .handlers import chat, healthz, stop, stream
from .intake import check_host, expect_handler
from .limiter import build_limiter as build_backend_limiter
from .logs import FailureLog, access_middleware, add_request_id, remember_client
from .observe import Observers, StreamObserver
from .openai_api import OPENAI_PREFIX, create_openai_app
from .providers import DemoProvider, OpenAIProvider, Provider, make_openai_client
from .providers.demo import DEMO_REASONER_MODEL
from .reader import ReaderSettings
from .registry import RegistrySettings, StreamRegistry
from .request_origin import OriginPolicy
from .responses import error_response
from .state import RELAY, RelayState
from .ui_chat import add_ui_chat_routes

if TYPE_CHECKING:
    from .metrics import RelayMetrics

log = logging.getLogger("llm_relay")

API_PREFIX = "/api"

# After a response to a request whose body was left unread (a refusal), aiohttp goes on reading and discarding the
# body for up to `lingering_time`, so that closing the connection does not reset the response away before the
# client has read it (RFC 9112 §9.6). Its default, 10 s, is ten seconds of reading at the wire's speed for every
# refused request; a second covers the bytes in flight.
LINGERING_TIME = 1.0


def runner_settings(config: Config) -> dict[str, Any]:
    """The keyword arguments of aiohttp's runner (``web.AppRunner``, ``web.run_app``) for the relay's own
    processes: ``python -m server`` and the gunicorn app. A host that embeds the relay sets these on its own
    runner (docs/request-limits.md).

    aiohttp closes a connection whose request head is not complete `keepalive_timeout` after the connection
    opened or its previous response ended (the same clock ends idle keep-alive connections; RFC 9112 §9.5 leaves
    both to the server). The body's timeout is the handler's own (`server.intake`).
    """
    return {
        "keepalive_timeout": config.request_head_timeout,
        "lingering_time": LINGERING_TIME,
        "shutdown_timeout": config.shutdown_grace,
        "access_log": None,
    }


def build_provider(config: Config) -> Provider:
    if config.resolved_provider == "demo":
        return DemoProvider(config.demo_delay)
    if config.resolved_provider != "openai":
        raise ValueError(f"unknown provider {config.provider!r}")
    client = make_openai_client(
        api_key=config.api_key,
        base_url=config.base_url,
        max_retries=config.upstream_max_retries,
        connect_timeout=config.upstream_connect_timeout,
        max_connections=config.max_streams or None,
    )
    return OpenAIProvider(client, include_usage=config.include_usage)


def build_limiter(config: Config) -> Limiter:
    if not config.limits_enabled:
        return NoLimits()
    return build_backend_limiter(config)


def build_identify(config: Config) -> Callable[[web.Request], str]:
    if (
        not config.limits_enabled
        and not config.api_keys_file
        and not (config.tokens_per_minute or config.tokens_per_day)
    ):
        # The client key is only an admission key: without limits or API keys, reading and parsing the peer's
        # address on every request would buy nothing.
        return _anyone
    return ClientIdentifier.from_config(config)


def _anyone(request: web.Request) -> str:
    return "anyone"


def _key_budgets(identify: Callable[[web.Request], str]) -> Mapping[str, KeyBudget]:
    """The API keys' own token budgets from the keys file, by client key."""
    api_keys = identify.api_keys if isinstance(identify, ClientIdentifier) else None
    return api_keys.budgets if api_keys is not None else {}


def _generation_settings(config: Config) -> GenerationSettings:
    return GenerationSettings(
        first_token_timeout=config.first_token_timeout,
        idle_timeout=config.idle_timeout,
        total_timeout=config.total_timeout,
        log_max_events=config.log_max_events,
        log_max_bytes=config.log_max_bytes,
    )


def _reader_settings(config: Config) -> ReaderSettings:
    return ReaderSettings(
        write_timeout=config.write_timeout,
        send_buffer=config.send_buffer,
        keepalive_interval=config.heartbeat,
        flush_window=config.flush_window,
        flush_bytes=config.flush_bytes,
        reconnect_hint_ms=config.reconnect_hint_ms,
        compression=config.compression,
    )


def _registry(config: Config, observer: StreamObserver) -> StreamRegistry:
    return StreamRegistry(
        RegistrySettings(
            resume_grace=config.resume_grace,
            retention=config.stream_retention,
            max_total_bytes=config.log_total_bytes,
        ),
        observer,
    )


def _rules(config: Config) -> RequestRules:
    model = config.resolved_model
    allowed = {model, *config.allowed_models}
    if config.resolved_provider == "demo":
        allowed.update((DEMO_MODEL, DEMO_REASONER_MODEL))
    return RequestRules(
        default_model=model,
        allowed_models=frozenset(allowed),
        max_messages=config.max_messages,
        max_message_chars=config.max_message_chars,
        content_part_types=frozenset(config.content_part_types) - {"text"},
        system_prompt=config.system_prompt or None,
    )


def create_relay_app(
    config: Config,
    *,
    provider: Provider | None = None,
    limiter: Limiter | None = None,
    budgets: TokenBudgets | None = None,
    metrics: RelayMetrics | None = None,
) -> web.Application:
    """The streaming API as a sub-application: ``GET|POST /chat``, ``GET|DELETE /streams/{id}``, ``GET /healthz``,
    and the AI SDK's ``POST /ui-chat`` and ``GET /ui-chat/{chat_id}/stream`` (docs/ai-sdk.md).

    `provider`, `limiter` and `budgets` default to what `config` describes; pass your own to reuse a client.
    `metrics` (`server.metrics.RelayMetrics`) is off unless given: an embedding application asks for it and serves
    it (docs/operations.md).
    """
    origin_policy = OriginPolicy.from_settings(config.public_origins, config.cors_origins)
    observer: StreamObserver = FailureLog() if metrics is None else Observers([FailureLog(), metrics])
    identify = build_identify(config)
    state = RelayState(
        config=config,
        provider=provider or build_provider(config),
        rules=_rules(config),
        generation_settings=_generation_settings(config),
        reader_settings=_reader_settings(config),
        limiter=limiter or build_limiter(config),
        identify=remember_client(identify),
        origin_policy=origin_policy,
        streams=_registry(config, observer),
        budgets=budgets or build_budgets(config, _key_budgets(identify)),
        observer=observer,
    )
    # One middleware: the access line, and refusals answered as JSON errors (it sees every response).
    api = web.Application(
        middlewares=[access_middleware(observer, error_response)], client_max_size=config.max_body_bytes
    )
    api.on_response_prepare.append(add_request_id)
    if config.stream_store == "redis":
        from .redis_streams import build_stream_store

        state.shared_streams = build_stream_store(config, state.streams, state.generation_settings)
    api[RELAY] = state
    chat_resource = api.router.add_resource("/chat", name="chat")
    # The expect handler leaves 100 Continue to the handler, which sends it once the client is admitted.
    routes = [
        chat_resource.add_route("GET", chat, expect_handler=expect_handler),
        chat_resource.add_route("POST", chat, expect_handler=expect_handler),
    ]
    stream_resource = api.router.add_resource("/streams/{id}", name="stream")
    # Every route refuses an expectation other than 100-continue as JSON, not only the chat's (which also meets it).
    routes += [
        stream_resource.add_route("GET", stream, expect_handler=expect_handler),
        stream_resource.add_route("DELETE", stop, expect_handler=expect_handler),
    ]
    api.router.add_get("/healthz", healthz, allow_head=False, expect_handler=expect_handler)
    routes += add_ui_chat_routes(api)
    if config.cors_origins:
        _setup_cors(api, config.cors_origins, routes)
    api.cleanup_ctx.append(_lifecycle)
    if metrics is not None:
        metrics.watch(state.streams)
        if state.budgets is not None:
            metrics.watch_budgets(state.budgets.stats)
        api.cleanup_ctx.append(metrics.sampling)
    api.on_shutdown.append(_end_streams)
    return api


def _setup_cors(api: web.Application, origins: tuple[str, ...], routes: Sequence[web.AbstractRoute]) -> None:
    # Explicit origins only, and no credentials: the API authenticates with a bearer key, never with cookies,
    # and "*" together with credentials is what the Fetch standard forbids. Any request header a listed origin's
    # preflight names is allowed (aiohttp-cors echoes them): the clients people use send their own, the openai
    # JS SDK its X-Stainless-* telemetry on every request, and a fixed list would fail their preflight.
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        allow_headers="*",
        expose_headers=("X-Stream-Id", "X-Request-Id", "Retry-After", "RateLimit", "RateLimit-Policy"),
        max_age=600,
    )
    cors = aiohttp_cors.setup(api, defaults=dict.fromkeys(origins, options))
    for route in routes:
        cors.add(route)


async def _lifecycle(api: web.Application) -> AsyncIterator[None]:
    """Shared clients live as long as the app; they are closed only after the last stream has ended."""
    state = api[RELAY]
    if state.shared_streams is not None:
        state.shared_streams.start()
    yield
    # In this order, and each step whatever the ones before it did: a failing close leaves nothing else open.
    async with contextlib.AsyncExitStack() as closing:
        closing.push_async_callback(state.provider.aclose)
        if state.budgets is not None:
            closing.push_async_callback(state.budgets.aclose)
        closing.push_async_callback(state.limiter.aclose)
        if state.shared_streams is not None:
            closing.push_async_callback(state.shared_streams.aclose)  # after the streams' ends, which it writes
        closing.callback(state.streams.close)
        await state.streams.shutdown(state.config.shutdown_grace)


async def _end_streams(api: web.Application) -> None:
    """Graceful shutdown: every reader gets an in-band ``server_shutdown`` event; generations without readers get
    the grace period, then are cancelled (their upstreams closed)."""
    state = api[RELAY]
    if state.shared_streams is not None:
        # Readers of other instances' streams end in band too (those streams go on where they run).
        await state.shared_streams.replicas.shutdown(0.0)
    await state.streams.shutdown(state.config.shutdown_grace)


def setup(app: web.Application, config: Config, *, prefix: str = API_PREFIX, **kwargs: object) -> web.Application:
    """Mount the streaming API into an existing application under `prefix`; returns the sub-application."""
    api = create_relay_app(config, **kwargs)  # type: ignore[arg-type]
    app.add_subapp(prefix, api)
    return api


def _metrics(app: web.Application, config: Config) -> RelayMetrics | None:
    """The standalone server's metrics (``--metrics``): ``GET /metrics`` on `app`, or with ``--metrics-port`` on a
    listener of its own that only serves it."""
    if not config.metrics:
        return None
    from .metrics import RelayMetrics, serve_metrics  # imported only when asked for (see server/metrics.py)

    metrics = RelayMetrics()
    if config.metrics_port:
        app.cleanup_ctx.append(serve_metrics(metrics, config.metrics_host, config.metrics_port))
        return metrics

    async def public_metrics(request: web.Request) -> web.StreamResponse:
        # On the public listener, the host check applies as for the page (a DNS-rebinding page must not read it).
        try:
            check_host(request, request.app[RELAY].origin_policy)
        except RelayError as error:
            return error_response(error)
        return await metrics.handle(request)

    app.router.add_get("/metrics", public_metrics, allow_head=False)
    return metrics


def setup_openai_compatible(
    app: web.Application, relay_api: web.Application, *, prefix: str = OPENAI_PREFIX
) -> web.Application:
    """Mount the OpenAI-compatible routes (``POST {prefix}/chat/completions``, ``GET {prefix}/models``) into `app`,
    sharing the state (streams, limits, provider) of `relay_api`, the sub-application `setup` returned; returns
    the new sub-application (docs/openai-compatible.md)."""
    v1, routes = create_openai_app(relay_api)
    origins = relay_api[RELAY].config.cors_origins
    if origins:
        _setup_cors(v1, origins, routes)
    app.add_subapp(prefix, v1)
    return v1


def create_app(config: Config | None = None) -> web.Application:
    """The standalone server: the chat page at ``/``, static files, ``/healthz``, the API under ``/api`` and the
    OpenAI-compatible routes under ``/v1``."""
    config = config or Config()
    app = web.Application(client_max_size=config.max_body_bytes)
    metrics = _metrics(app, config)
    api = setup(app, config, metrics=metrics)
    setup_openai_compatible(app, api)
    app[RELAY] = api[RELAY]
    app.router.add_get("/healthz", healthz, allow_head=False)
    from .page import setup_page

    setup_page(app, config)
    return app
