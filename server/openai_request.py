"""A ``POST /v1/chat/completions`` body: what the OpenAI-compatible endpoint reads itself, and the chat it asks for.
No IO.

The endpoint itself takes ``n`` (1 only); the rest, ``stream`` and ``stream_options`` included, is the chat request
in OpenAI's shape, validated by `server/chat_request.py` (`parse_chat_body`) with the same allowlist and messages
as ``POST /api/chat`` (an unknown field is a 400 naming it, as everywhere). ``stream_options.include_usage`` is the
client's wish for a usage chunk; the relay asks its upstream for usage on its own (``--include-usage``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import chat_request
from .chat_request import ChatRequest, RequestRules
from .errors import RequestError

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


def parse_openai_request(body: bytes, rules: RequestRules) -> OpenAIRequest:
    """The request of a ``POST /v1/chat/completions`` body, or a `RequestError` saying what to change.

    >>> rules = RequestRules(default_model="m", allowed_models=frozenset({"m"}))
    >>> r = parse_openai_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,'
    ...                          b' "stream_options": {"include_usage": true}}', rules)
    >>> r.stream, r.include_usage, r.chat.model
    (True, True, 'm')
    """
    data = decode_json_object(body)
    if data.get("stream_options") is not None and data.get("stream") is not True:
        raise RequestError("stream_options is only allowed with stream: true")
    n = data.pop("n", None)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError("n must be 1: the relay streams one choice")
    # chat_request.py validates the rest as it does every chat body (one allowlist for every endpoint).
    chat = chat_request.parse_chat_body(data, rules, shape="openai")
    return OpenAIRequest(chat, chat.stream, chat.include_usage)
