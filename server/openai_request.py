"""A ``POST /v1/chat/completions`` body: what the OpenAI-compatible endpoint reads itself, and the chat it asks for.
No IO.

The endpoint itself reads ``stream``, ``stream_options`` and ``n``; everything else is the chat request, validated
by `server/chat_request.py` with the same allowlist and messages as ``POST /api/chat`` (an unknown field is a 400
naming it, as everywhere). ``stream_options.include_usage`` is the client's wish for a usage chunk; the relay asks
its upstream for usage on its own (``--include-usage``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import chat_request
from .chat_request import ChatRequest, RequestRules
from .errors import RequestError
from .json_wire import json_bytes

__all__ = ["OpenAIRequest", "decode_json_object", "parse_openai_request"]


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    chat: ChatRequest
    stream: bool = False
    include_usage: bool = False


def _refuse_constant(name: str) -> object:
    raise RequestError(f"the body holds {name}, which is not JSON (RFC 8259 §6)")


def decode_json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object, decoded strictly (UTF-8 only; no NaN or Infinity).

    >>> decode_json_object(b'{"a": 1}')
    {'a': 1}
    >>> decode_json_object(b'[1]')
    Traceback (most recent call last):
    ...
    server.errors.RequestError: the body must be a JSON object
    """
    try:
        # Decode the bytes ourselves: json.loads(bytes) sniffs UTF-16/32 and passes encoded surrogates through.
        data = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except RequestError:
        raise
    except ValueError:  # UnicodeDecodeError, JSONDecodeError, and int()'s 4300-digit limit
        raise RequestError("the body is not valid JSON") from None
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    return data


def _flag(value: object, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false")
    return value


def parse_openai_request(body: bytes, rules: RequestRules) -> OpenAIRequest:
    """The request of a ``POST /v1/chat/completions`` body, or a `RequestError` saying what to change.

    >>> rules = RequestRules(default_model="m", allowed_models=frozenset({"m"}))
    >>> r = parse_openai_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,'
    ...                          b' "stream_options": {"include_usage": true}}', rules)
    >>> r.stream, r.include_usage, r.chat.model
    (True, True, 'm')
    """
    data = decode_json_object(body)
    stream = _flag(data.pop("stream", None), "stream")
    options = data.pop("stream_options", None)
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed with stream: true")
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object")
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise RequestError(f"unknown field: stream_options.{unknown[0]}")
        include_usage = _flag(options.get("include_usage"), "stream_options.include_usage")
    n = data.pop("n", None)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError("n must be 1: the relay streams one choice")
    # chat_request.py validates the rest as it does every chat body (one allowlist for every endpoint).
    return OpenAIRequest(chat_request.from_json_body(json_bytes(data), rules), stream, include_usage)
