"""Settings: one frozen `Config`, filled from the command line and the environment.

Every option has an environment variable (``LLM_RELAY_`` + the option's name in capitals, ``-`` as ``_``), and
the upstream's own conventional ones are read too: ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_MODEL``.
The command line wins over the environment, which wins over the defaults.

A setting the relay cannot start with is a `ConfigError`; ``llm-relay`` (or ``python -m server``, the same
program) prints every startup error (a bad
option value, a missing ``--api-keys-file``, a bad ``--redis-url``, a port in use) as one line on stderr and exits
with status 2, as argparse does for a bad option: `startup_error`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NoReturn
from urllib.parse import urlsplit

from .compression import parse_codings

DEMO_MODEL = "llm-relay-demo"
# The console script's name (setup.cfg); ``python -m server`` runs the same program.
PROG = "llm-relay"


class ConfigError(ValueError):
    """A setting the relay cannot start with. The message names the option and never quotes a secret."""


def startup_error(message: str) -> NoReturn:
    """Print `message` as one line (``llm-relay: error: ...``) and exit with status 2."""
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")
    raise SystemExit(2)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    # Connections the kernel queues before they are accepted: enough for every client reconnecting at once after a
    # restart (server/backlog.py); the kernel lowers it to net.core.somaxconn.
    backlog: int = 4096
    # "auto" relays an OpenAI-compatible upstream when an API key or a base URL is configured (Ollama and vLLM need
    # no key), else the built-in demo model.
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
    # Content codings a stream may be compressed with, in order of preference (server/compression.py); () = off.
    compression: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    # The origins (scheme://name[:port]) browsers reach the relay by. Besides these names, only IP addresses and
    # localhost are answered (request_origin.py: a Host the requester chose may be a DNS-rebinding name).
    public_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    # How long a connection may take to send a complete request head (and how long an idle keep-alive connection
    # stays open: aiohttp has one clock for both), and a request its whole body. Seconds; the body's 0 = no limit.
    request_head_timeout: float = 10.0
    request_body_timeout: float = 30.0
    max_messages: int = 200
    max_message_chars: int = 32_000
    # Put before every conversation as a system message (chat_request.py).
    system_prompt: str | None = None
    # Content part types besides text that a user message may carry, passed on as sent (e.g. image_url).
    content_part_types: tuple[str, ...] = ()
    shutdown_grace: float = 5.0
    # Resumable streams (see server/registry.py): how long an opted-in generation outlives its last reader, how
    # long an ended one stays readable, and the bounds of the logs.
    resume_grace: float = 15.0
    stream_retention: float = 60.0
    log_max_events: int = 20_000
    log_max_bytes: int = 2 << 20
    log_total_bytes: int = 256 << 20
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
    # Token budgets (server/budget.py): per client, 0 = off; an API key's own values come from the keys file.
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    token_ceiling: int = 4096

    @property
    def resolved_provider(self) -> str:
        if self.provider == "auto":
            return "openai" if self.api_key or self.base_url else "demo"
        return self.provider

    @property
    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEMO_MODEL if self.resolved_provider == "demo" else "gpt-4o-mini"

    def with_changes(self, **changes: Any) -> Config:
        return replace(self, **changes)


def public_url(url: str) -> str:
    """`url` without the parts that can carry a credential (user info, query, fragment), for logs.

    >>> public_url("https://user:secret@example.com:8443/v1?api-key=secret#x")
    'https://example.com:8443/v1'
    >>> public_url("http://[::1]:11434/v1")
    'http://[::1]:11434/v1'
    """
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(not a valid URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def describe_source(config: Config) -> str:
    """Where replies come from, for the startup line: the provider, the upstream (no credentials), the model."""
    model = config.resolved_model
    if config.resolved_provider == "demo":
        why = "--provider demo" if config.provider == "demo" else "no --base-url or --api-key configured"
        return f"provider demo (the built-in simulated model: {why}), model {model}"
    upstream = public_url(config.base_url) if config.base_url else "https://api.openai.com/v1 (the openai default)"
    key = "with an API key" if config.api_key else "without an API key"
    return f"provider {config.resolved_provider}, upstream {upstream} {key}, model {model}"


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


def _int_between(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"not {what} ({low}-{high}): {text!r}")
        return value

    parse.__name__ = "int"
    return parse


_port = _int_between(0, 65535, "a TCP port")
# A bound against typos: 0 or a negative would leave a tiny queue, and 65535 is far above any default somaxconn.
_backlog = _int_between(1, 65535, "a listen backlog")


def _base_url(text: str) -> str:
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise argparse.ArgumentTypeError("not a URL") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        # Not echoed: a base URL may carry credentials (https://user:secret@host/v1).
        raise argparse.ArgumentTypeError("not an http:// or https:// URL with a host, e.g. http://localhost:11434/v1")
    if parts.username is not None or parts.password is not None:
        # The openai client always sends its own Authorization header, and aiohttp refuses a request that has both
        # (every stream would fail with a 500).
        raise argparse.ArgumentTypeError("must not carry user:password@; give the upstream's key with --api-key")
    return text.strip()


_base_url.__name__ = "URL"


def _codings(text: str) -> tuple[str, ...]:
    try:
        return parse_codings(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_codings.__name__ = "codings"


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
        "backlog",
        "connections the kernel queues before they are accepted (after a restart every client reconnects at "
        "once); capped by net.core.somaxconn",
        _backlog,
    ),
    _Option(
        "provider",
        "where replies come from: demo (built-in, simulated), openai (an OpenAI-compatible "
        "upstream) or auto (openai when an API key or a base URL is set)",
        choices=("auto", "demo", "openai"),
    ),
    _Option(
        "base-url",
        "OpenAI-compatible upstream base URL, e.g. http://localhost:11434/v1",
        _base_url,
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
        "compression",
        "compress streams for clients that accept it, e.g. gzip,deflate (off = never); every batch of frames is "
        "flushed, so tokens are not delayed",
        _codings,
    ),
    _Option(
        "cors-origin",
        "an origin allowed to call the API from a browser (repeatable; default none)",
        repeatable=True,
        field="cors_origins",
    ),
    _Option(
        "public-origin",
        "an origin browsers reach this relay by, e.g. https://chat.example.com (repeatable); requests sent to "
        "another host name are refused, IP addresses and localhost are always answered",
        repeatable=True,
        field="public_origins",
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
    _Option("system-prompt", "a system message put before every conversation (default none)"),
    _Option(
        "content-part-type",
        "a content part type besides text that user messages may carry, passed on to the upstream as sent, e.g. "
        "image_url (repeatable; default none)",
        repeatable=True,
        field="content_part_types",
    ),
    _Option("shutdown-grace", "seconds open streams get to finish on shutdown", _non_negative(float)),
    _Option(
        "resume-grace",
        "seconds a stream that opted in to resume keeps generating after its last reader left",
        _non_negative(float),
    ),
    _Option(
        "reconnect-hint-ms",
        "SSE retry hint, milliseconds: a resumable stream's reconnection delay; at shutdown, jittered up to twice it",
        _non_negative(int),
    ),
    _Option("stream-retention", "seconds an ended stream stays resumable", _non_negative(float)),
    _Option("log-max-events", "most events one stream's log keeps for resuming", _positive(int)),
    _Option("log-max-bytes", "most bytes one stream's log keeps for resuming (estimated)", _positive(int)),
    _Option("log-total-bytes", "most bytes all stream logs keep together (estimated)", _non_negative(int)),
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
    _Option(
        "tokens-per-minute",
        "tokens (prompt and reply) a client may use per minute, reserved up front and reconciled with the "
        "upstream's usage (0 = no budget; a key's own value in --api-keys-file wins)",
        _non_negative(int),
    ),
    _Option(
        "tokens-per-day",
        "tokens a client may use per UTC day (0 = no quota; a key's own value in --api-keys-file wins)",
        _non_negative(int),
    ),
    _Option(
        "token-ceiling",
        "with a token budget: the reply tokens reserved for a request that sets no max_tokens",
        _positive(int),
    ),
)


_SECRETS = frozenset({"api-key", "redis-url"})


def shown_default(value: object) -> str | None:
    """A default as ``--help`` shows it: booleans as the words the options take, nothing for an empty value.

    >>> [shown_default(v) for v in (True, 0.03, 60.0, 0, "2/s", (), None, "")]
    ['true', '0.03', '60', '0', '2/s', None, None, None]
    """
    if value is None or value in ((), ""):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def option_help(option: _Option, default: object) -> str:
    """An option's ``--help`` text: what it does, its environment variables, and its default once (not when the
    text already names it, nor for a secret)."""
    envs = " or ".join(_env_names(option))
    if option.name in _SECRETS:
        return f"{option.help} [env {envs}; a secret: its value is never shown]"
    shown = None if "default" in option.help else shown_default(default)
    return f"{option.help} [env {envs}" + (f"; default {shown}]" if shown is not None else "]")


def _metavar(option: _Option) -> str | None:
    if option.choices:
        return None  # argparse shows {a,b,c}
    if option.parse is _bool:
        return "true|false"
    return option.name.upper().replace("-", "_")


def _field_name(option: _Option) -> str:
    return option.field or option.name.replace("-", "_")


def _env_names(option: _Option) -> tuple[str, ...]:
    return ("LLM_RELAY_" + option.name.upper().replace("-", "_"), *option.env)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints its whole usage (thirty lines) before the message; one line says what is wrong.
        startup_error(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        # The full usage would repeat every option once more (fifty lines) before the list that explains them.
        usage="%(prog)s [--OPTION VALUE ...]",
        description="llm-relay: stream chat completions to browsers (SSE) and fetch clients (NDJSON).",
    )
    defaults = Config()
    for option in _OPTIONS:
        parser.add_argument(
            f"--{option.name}",
            dest=_field_name(option),
            type=option.parse,
            action="append" if option.repeatable else "store",
            choices=option.choices,
            metavar=_metavar(option),
            default=None,
            help=option_help(option, getattr(defaults, _field_name(option))),
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
    if "public_origins" in values:
        from .request_origin import OriginPolicy

        try:
            OriginPolicy.from_settings(values["public_origins"])
        except ValueError as exc:
            parser.error(str(exc))
    return Config(**values)


CONFIG_FIELDS = frozenset(f.name for f in fields(Config))
