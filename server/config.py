"""Settings: one frozen `Config`, filled from the command line and the environment.

Every option has an environment variable (``LLM_RELAY_`` + the option's name in capitals, ``-`` as ``_``), and
the upstream's own conventional ones are read too: ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_MODEL``.
The command line wins over the environment, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEMO_MODEL = "llm-relay-demo"


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    # "auto" relays an OpenAI-compatible upstream when an API key is configured, else the built-in demo model.
    provider: str = "auto"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    allowed_models: tuple[str, ...] = ()
    demo_delay: float = 0.03
    upstream_max_retries: int = 2
    upstream_connect_timeout: float = 10.0
    include_usage: bool = True
    # Relay timeouts, seconds; 0 turns one off.
    first_token_timeout: float = 60.0
    idle_timeout: float = 60.0
    total_timeout: float = 600.0
    write_timeout: float = 10.0
    send_buffer: int = 0
    heartbeat: float = 15.0
    ndjson_keepalive: bool = False
    # Flush policy: 0/0 writes every frame the moment it exists; otherwise frames are held until the window
    # (seconds) has passed since the first held one or the held bytes reach flush_bytes.
    flush_window: float = 0.0
    flush_bytes: int = 0
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    # How long a connection may take to send a complete request head (and how long an idle keep-alive connection
    # stays open: aiohttp has one clock for both), and a request its whole body. Seconds; the body's 0 = no limit.
    request_head_timeout: float = 10.0
    request_body_timeout: float = 30.0
    max_messages: int = 200
    max_message_chars: int = 32_000
    shutdown_grace: float = 5.0
    reconnect_hint_ms: int = 3000
    use_uvloop: bool = True
    # The relay's own processes only (python -m server, the gunicorn app): freeze the startup objects and collect
    # the young generation less often (gc_tuning.py).
    gc_tuning: bool = True
    reuse_port: bool = False
    # Admission control (see server/limits.py): a per-client token bucket and concurrency caps.
    rate: str = "2/s"
    burst: int = 20
    max_streams_per_client: int = 8
    max_streams: int = 2000
    redis_url: str | None = field(default=None, repr=False)
    redis_fail_open: bool = True
    trusted_proxies: tuple[str, ...] = ()
    api_keys_file: str | None = None
    # With API keys: failed authentications an address may make at once, and how fast they are forgiven.
    auth_failures: int = 10
    auth_failure_rate: str = "6/m"
    limits_enabled: bool = True
    max_tracked_clients: int = 100_000

    @property
    def resolved_provider(self) -> str:
        if self.provider == "auto":
            return "openai" if self.api_key else "demo"
        return self.provider

    @property
    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEMO_MODEL if self.resolved_provider == "demo" else "gpt-4o-mini"

    def with_changes(self, **changes: Any) -> Config:
        return replace(self, **changes)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not value >= 0:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not 0 < value < float("inf"):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (0-65535): {text!r}")
    return value


_port.__name__ = "int"


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True, slots=True)
class _Option:
    name: str
    help: str
    parse: Callable[[str], Any] = str
    env: tuple[str, ...] = ()
    repeatable: bool = False
    choices: tuple[str, ...] | None = None
    field: str = ""


_OPTIONS: tuple[_Option, ...] = (
    _Option("host", "address to listen on"),
    _Option("port", "port to listen on", _port),
    _Option(
        "provider",
        "where replies come from: demo (built-in, simulated), openai (an OpenAI-compatible "
        "upstream) or auto (openai when an API key is set)",
        choices=("auto", "demo", "openai"),
    ),
    _Option(
        "base-url",
        "OpenAI-compatible upstream base URL, e.g. http://localhost:11434/v1",
        env=("OPENAI_BASE_URL",),
    ),
    _Option("api-key", "upstream API key (never logged or echoed)", env=("OPENAI_API_KEY",)),
    _Option(
        "model",
        "model to ask the upstream for (default gpt-4o-mini, or the demo model)",
        env=("OPENAI_MODEL",),
    ),
    _Option(
        "allow-model",
        "another model a client may ask for (repeatable)",
        repeatable=True,
        field="allowed_models",
    ),
    _Option("demo-delay", "seconds between demo model tokens", _non_negative(float)),
    _Option(
        "upstream-max-retries",
        "retries of the openai client before the first byte (never after)",
        _non_negative(int),
    ),
    _Option("upstream-connect-timeout", "seconds to connect to the upstream", _non_negative(float)),
    _Option("include-usage", "ask the upstream for token usage (stream_options.include_usage)", _bool),
    _Option("first-token-timeout", "seconds to wait for the first token (0 = no limit)", _non_negative(float)),
    _Option("idle-timeout", "longest gap between tokens, seconds (0 = no limit)", _non_negative(float)),
    _Option("total-timeout", "longest stream, seconds (0 = no limit)", _non_negative(float)),
    _Option("write-timeout", "seconds a client may stop reading before it is dropped", _non_negative(float)),
    _Option(
        "send-buffer",
        "fix each stream socket's kernel send buffer to this many bytes, bounding what a client that stops "
        "reading can hold in the kernel (0 = the kernel's autotuning)",
        _non_negative(int),
    ),
    _Option(
        "heartbeat",
        "seconds between SSE heartbeat comments on a quiet stream (0 = off)",
        _non_negative(float),
    ),
    _Option("ndjson-keepalive", 'send {"type":"ping"} lines on quiet NDJSON streams too', _bool),
    _Option(
        "flush-window",
        "hold frames up to this many seconds to coalesce writes (0 = immediate)",
        _non_negative(float),
    ),
    _Option(
        "flush-bytes",
        "with a flush window, write as soon as this many bytes are held (0 = no limit)",
        _non_negative(int),
    ),
    _Option(
        "cors-origin",
        "an origin allowed to call the API from a browser (repeatable; default none)",
        repeatable=True,
        field="cors_origins",
    ),
    _Option("max-body-bytes", "largest request body accepted", _non_negative(int)),
    _Option(
        "request-head-timeout",
        "seconds a connection may take to send a complete request head; also how long an idle keep-alive "
        "connection is kept (python -m server and the gunicorn app; a host app sets its runner's keepalive_timeout)",
        _positive(float),
    ),
    _Option(
        "request-body-timeout",
        "seconds a request may take to send its whole body, else 408 (0 = no limit)",
        _non_negative(float),
    ),
    _Option("max-messages", "most messages in one request", _non_negative(int)),
    _Option("max-message-chars", "longest message, in characters", _non_negative(int)),
    _Option("shutdown-grace", "seconds open streams get to finish on shutdown", _non_negative(float)),
    _Option("uvloop", "use uvloop when it is installed", _bool, field="use_uvloop"),
    _Option(
        "gc-tuning",
        "tune the garbage collector for streaming (this process and gunicorn workers, never an embedding app)",
        _bool,
    ),
    _Option("reuse-port", "listen with SO_REUSEPORT, so several processes can share the port", _bool),
    _Option("rate", "requests a client may start per time, e.g. 2/s or 30/m (0/s = no rate limit)"),
    _Option("burst", "requests a client may start at once before the rate applies", _non_negative(int)),
    _Option("max-streams-per-client", "concurrent streams per client (0 = no cap)", _non_negative(int)),
    _Option("max-streams", "concurrent streams in all (0 = no cap)", _non_negative(int)),
    _Option("max-tracked-clients", "client buckets kept in memory (in process)", _non_negative(int)),
    _Option("redis-url", "share limits between processes through this Redis, e.g. redis://127.0.0.1:6379/0"),
    _Option("redis-fail-open", "admit requests when Redis is unreachable (false: refuse them)", _bool),
    _Option(
        "trusted-proxy",
        "address or network whose X-Forwarded-For is believed (repeatable)",
        repeatable=True,
        field="trusted_proxies",
    ),
    _Option("api-keys-file", "file of client API keys, one per line; then a key is required"),
    _Option(
        "auth-failures",
        "with API keys: failed authentications an address may make before it must wait (429) (0 = no limit)",
        _non_negative(int),
    ),
    _Option("auth-failure-rate", "how fast failed authentications are forgiven, e.g. 6/m (0/m = no limit)"),
    _Option("limits", "admission control on or off", _bool, field="limits_enabled"),
)


def _field_name(option: _Option) -> str:
    return option.field or option.name.replace("-", "_")


def _env_names(option: _Option) -> tuple[str, ...]:
    return ("LLM_RELAY_" + option.name.upper().replace("-", "_"), *option.env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="llm-relay: stream chat completions to browsers (SSE) and fetch clients (NDJSON).",
    )
    defaults = Config()
    for option in _OPTIONS:
        default = getattr(defaults, _field_name(option))
        envs = " or ".join(_env_names(option))
        shown = "(secret)" if option.name in {"api-key", "redis-url"} else default
        parser.add_argument(
            f"--{option.name}",
            dest=_field_name(option),
            type=option.parse,
            action="append" if option.repeatable else "store",
            choices=option.choices,
            metavar=None if option.choices else option.name.upper().replace("-", "_"),
            default=None,
            help=f"{option.help} [env {envs}; default {shown}]",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration from `argv` (default: none) and `environ` (default: os.environ)."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(list(argv or []))
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        name = _field_name(option)
        given = getattr(args, name)
        if given is None:
            for env_name in _env_names(option):
                raw = env.get(env_name)
                if raw:
                    try:
                        given = _list(raw) if option.repeatable else option.parse(raw)
                    except (ValueError, argparse.ArgumentTypeError) as exc:
                        parser.error(f"{env_name}: {exc}")
                    if option.choices is not None and given not in option.choices:
                        parser.error(f"{env_name}: {raw!r} is not one of {', '.join(option.choices)}")
                    break
        if given is None:
            continue
        values[name] = tuple(given) if option.repeatable else given
    for name in ("rate", "auth_failure_rate"):
        if name in values:
            from .limits import parse_rate

            try:
                parse_rate(values[name])
            except ValueError as exc:
                parser.error(f"--{name.replace('_', '-')}: {exc}")
    if "trusted_proxies" in values:
        from .client_key import parse_networks

        try:
            parse_networks(values["trusted_proxies"])
        except ValueError as exc:
            parser.error(str(exc))
    return Config(**values)


CONFIG_FIELDS = frozenset(f.name for f in fields(Config))
