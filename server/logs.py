"""The relay's logs: text or JSON lines, one access line per API request, and a line per upstream failure.

    request ─▶ access (middleware): request id (X-Request-Id accepted or made) ─▶ handler ─▶ response
                    └── when the handler returns (a stream has ended by then): one ``llm_relay.access`` line
    generation ends with an error or a timeout ─▶ FailureLog: one ``llm_relay.upstream`` warning

An access line names the request id, the stream id, the client (a hash of its key, never the key), the endpoint,
the framing, the status, the outcome, the time to first token, the duration, the events and bytes written, and
the upstream's HTTP status. A failure line names the stream, the request, the error type and the upstream's
status; never the upstream's body, which can echo a prompt or a credential. Every field is one the relay made or
checked: a client's request id only when it is well-formed (`server.observe.accepted_request_id`), a path as
aiohttp received it (percent-encoded, so no control character reaches a text line).

With ``--log-format json`` each line is one JSON object: ``ts``, ``level``, ``logger``, ``message`` and the
line's fields (docs/operations.md lists them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .config import LOG_FORMATS, LOG_LEVELS
from .errors import RelayError, StreamTimeout, UpstreamError
from .generation import Outcome
from .observe import StreamObserver, current_request_id, reported_usage, request_id_for
from .responses import ERROR_TYPE, Respond, refusal_for

if TYPE_CHECKING:
    from .generation import Generation
    from .reader import Reader

access_log = logging.getLogger("llm_relay.access")
upstream_log = logging.getLogger("llm_relay.upstream")

REQUEST_ID_HEADER = "X-Request-Id"
# The longest path an access line repeats (a 404's path is the client's choice).
_PATH_MAX = 200


@dataclass(frozen=True, slots=True)
class ReadingRequest:
    """The reader that served a request, and whether it joined an existing stream."""

    reader: Reader
    resumed: bool


REQUEST_ID = web.RequestKey("llm_relay_request_id", str)
CLIENT_KEY = web.RequestKey("llm_relay_client_key", str)
READING = web.RequestKey("llm_relay_reading", ReadingRequest)


# -- formats --------------------------------------------------------------------------------------------------


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, message, the record's `fields`, and the
    exception's traceback as ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """The relay's own processes (``python -m server``, gunicorn workers): one handler on stderr, in `log_format`.

    The relay's loggers (``llm_relay.*``) log at `level`; libraries only from WARNING (httpx logs every upstream
    request at INFO), or at `level` when it is debug. An embedding application configures logging itself.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Neither format shows a record's thread or process: leave them out of every record (the logging HOWTO's
    # "Optimization"). The relay's own processes only; an embedding application decides for its own.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if level == "debug" else logging.WARNING)
    logging.getLogger("llm_relay").setLevel(numeric)


def _text(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())


def client_hash(key: str) -> str:
    """What an access line says of a client: 16 hex digits of SHA-256 over its key (an address, or the hash of
    its API key), enough to tell clients apart and count them, never the key.

    >>> client_hash("ip:127.0.0.1")
    '508cc0fe26185d71'
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- the access line ------------------------------------------------------------------------------------------


def remember_client(identify: Callable[[web.Request], str]) -> Callable[[web.Request], str]:
    """`identify`, also keeping the client key on the request for the access line."""

    def identify_and_remember(request: web.Request) -> str:
        key = identify(request)
        request[CLIENT_KEY] = key
        return key

    return identify_and_remember


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response of the API carries its request id (streams set their headers
    before the first byte, so this is the one place that sees them all)."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


def access_middleware(observer: StreamObserver, respond: Respond | None = None) -> Middleware:
    """The API's outermost middleware: the request id, then one access line when the handler returns (a stream
    has ended by then) and, for a refusal, `observer.request_refused`. With `respond`, it also answers aiohttp's
    own 404 and 405 and a `RelayError` a handler raised with it (`server.responses.refusal_for`): one middleware
    rather than two, since each is a suspended frame per open stream."""

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = request_id
        token = current_request_id.set(request_id)
        response: web.StreamResponse | None = None
        failed = False
        try:
            response = await handler(request)
            return response
        except (web.HTTPException, RelayError) as exc:
            response = None if respond is None else refusal_for(exc, respond)
            if response is not None:
                return response
            if isinstance(exc, web.HTTPException):  # an HTTP exception is the response aiohttp sends
                response = exc
            else:  # a bug: aiohttp answers 500 and logs the traceback
                failed = True
            raise
        except Exception:  # a bug: aiohttp answers 500 and logs the traceback
            failed = True
            raise
        finally:
            current_request_id.reset(token)
            try:
                _access_line(request, response, time.monotonic() - started, observer, failed)
            except Exception:  # a log line must never turn a served request into a failure
                access_log.exception("the access line could not be written")
            # The reader keeps the request, so the request keeping the reader would make the two a reference
            # cycle that only the garbage collector frees (pauses that grow with every retained stream).
            request.pop(READING, None)

    return access


def _access_line(
    request: web.Request,
    response: web.StreamResponse | None,
    duration: float,
    observer: StreamObserver,
    failed: bool,
) -> None:
    reading = request.get(READING)
    status = response.status if response is not None else (500 if failed else None)
    error_type = response.get(ERROR_TYPE) if response is not None else None
    if reading is None and error_type is not None and status is not None:
        observer.request_refused(error_type, status)
    # A health check is polled every few seconds by load balancers: kept out of the access log unless debugging.
    level = logging.DEBUG if request.path.endswith("/healthz") else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    route = request.match_info.route.resource
    fields: dict[str, object] = {
        "request_id": request[REQUEST_ID],
        "stream_id": None,
        "client": client_hash(request[CLIENT_KEY]) if CLIENT_KEY in request else None,
        "method": request.method,
        "endpoint": route.canonical if route is not None else request.rel_url.raw_path[:_PATH_MAX],
        "framing": None,
        "status": status,
        "outcome": _outcome(response, error_type, failed),
        "error": error_type,
        "ttft_ms": None,
        "duration_ms": _ms(duration),
        "events": None,
        "bytes": None,
        "upstream_status": None,
    }
    if reading is not None:
        reader, generation = reading.reader, reading.reader.generation
        first = generation.first_event_at
        fields.update(
            stream_id=generation.id,
            framing=reader.framing.name,
            outcome=reader.outcome if reader.outcome != "reading" else fields["outcome"],
            resumed=reading.resumed,
            ttft_ms=_ms(first - generation.started_at if first is not None else None),
            events=reader.position - reader.after,
            bytes=reader.bytes_written,
            upstream_status=generation.upstream.status,
            stream_outcome=generation.outcome.value,
        )
        usage = reported_usage(generation)
        if usage is not None:
            fields.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
    access_log.log(level, "%s", _text(fields), extra={"fields": fields})


def _outcome(response: web.StreamResponse | None, error_type: str | None, failed: bool) -> str:
    if response is None:
        return "failed" if failed else "cancelled"
    return "refused" if error_type or response.status >= 400 else "ok"


# -- upstream failures ----------------------------------------------------------------------------------------


class FailureLog(StreamObserver):
    """A warning for every generation that ended in an error or a timeout: the stream, the request, the error
    type and the upstream's HTTP status (none when it never answered). Never the upstream's body."""

    def stream_ended(self, generation: Generation) -> None:
        failure = generation.failure
        if failure is None or generation.outcome not in (Outcome.ERROR, Outcome.TIMEOUT):
            return
        fields: dict[str, object] = {
            "stream_id": generation.id,
            # The generation's task started from the request's: its context holds the request id.
            "request_id": current_request_id.get(),
            "error": failure.type,
            "status": failure.status,
            "upstream_status": generation.upstream.status,
        }
        if isinstance(failure, UpstreamError):
            what = "the upstream failed"
        elif isinstance(failure, StreamTimeout):
            what = "the upstream was too slow"
        else:
            what = "the stream failed"
        upstream_log.warning("%s: %s (%s)", what, _text(fields), failure.message, extra={"fields": fields})


__all__ = [
    "CLIENT_KEY",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "READING",
    "REQUEST_ID",
    "REQUEST_ID_HEADER",
    "FailureLog",
    "JSONFormatter",
    "ReadingRequest",
    "access_middleware",
    "add_request_id",
    "client_hash",
    "configure_logging",
    "remember_client",
]
