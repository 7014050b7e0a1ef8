"""The OpenAI chat completions wire: the ``chat.completion.chunk`` stream and the assembled ``chat.completion``.
Pure: no aiohttp, no asyncio; the time is passed in.

Both are framings (`server/framing.py`'s `Framing`) with state of their own, so a handler makes one per reader:

* `OpenAIChunkFraming` (``stream: true``): every event is one ``data: {chunk}`` block, the end is
  ``data: [DONE]``. The response's id, creation time and model are the same in every chunk; the first chunk's
  delta carries ``"role": "assistant"``; reasoning is ``reasoning_content`` (DeepSeek's field, which the openai
  SDKs keep as an extra field); a tool call's first piece carries its id, ``"type": "function"`` and name, the
  later ones only their index and a fragment of the arguments. With ``stream_options.include_usage`` every chunk
  has ``"usage": null`` and one chunk with ``"choices": []`` and the usage comes before ``[DONE]``, as OpenAI
  sends it. A failure is ``data: {"error": {...}}``, which the openai SDKs raise as an ``APIError``.
* `OpenAICompletionFraming` (``stream: false``): nothing until the end, then the whole ``chat.completion``. It has
  nothing to say in band about a failure (its `encode` of an `Error` is empty): the reader answers the failure
  with an HTTP status instead, since no byte was written before.

Only ``data:`` lines are written. The openai SDKs' SSE parsers (Python ``openai._streaming.SSEDecoder``, and the JS
``SSEDecoder`` alike) turn every blank line that ends a block with any field into an event and parse its data as
JSON: an ``id:``-only or ``retry:``-only block crashes them, and so does a comment once an ``id:`` was seen (the
last event id is kept, so the comment's blank line dispatches an empty event). Without any ``id:``, a comment
block is skipped whole by both, so the heartbeat is ``: ping`` and the stream never carries an id or a retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from .errors import RelayError
from .events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta
from .json_wire import json_bytes, json_str

__all__ = [
    "OpenAIChunkFraming",
    "OpenAICompletionFraming",
    "completion_id",
    "openai_error_body",
    "openai_error_type",
]

_DONE: Final = b"data: [DONE]\n\n"


def completion_id(stream_id: str) -> str:
    """The ``id`` of the completion relayed as stream `stream_id` (OpenAI's ids start with ``chatcmpl-``)."""
    return f"chatcmpl-{stream_id}"


def openai_error_type(status: int) -> str:
    """OpenAI's coarse error ``type`` for an HTTP status; our own, finer type goes in ``code``.

    >>> openai_error_type(400), openai_error_type(401), openai_error_type(429), openai_error_type(504)
    ('invalid_request_error', 'authentication_error', 'rate_limit_error', 'server_error')
    """
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(error: RelayError | Error) -> dict[str, object]:
    """OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, for a refusal (its type from its
    status) or a failure in band (always ``server_error``: once the stream began, the request was good, and what
    ended it is the upstream's or the relay's doing: a timeout, an upstream failure, a stop, a shutdown).

    >>> openai_error_body(Error("timeout", "the model stopped answering mid-reply"))["error"]["type"]
    'server_error'
    """
    kind = openai_error_type(error.status) if isinstance(error, RelayError) else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": None, "code": error.type}}


# Our finish reasons are the upstream's, which already are OpenAI's (stop, length, tool_calls, content_filter).
def _finish_reason(done: Done) -> str:
    return done.finish_reason or "stop"


def _tool_call_delta(event: ToolCallDelta) -> dict[str, object]:
    function: dict[str, object] = {"arguments": event.arguments}
    piece: dict[str, object] = {"index": event.index}
    if event.id is not None:
        piece["id"] = event.id
        piece["type"] = "function"
    if event.name is not None:
        function["name"] = event.name
    piece["function"] = function
    return piece


class OpenAIChunkFraming:
    """``chat.completion.chunk`` SSE for one response (make one per reader)."""

    name = "openai"
    content_type = "text/event-stream; charset=utf-8"

    __slots__ = ("_created", "_head", "_include_usage", "_model", "_role_sent", "_usage_null")

    def __init__(self, model: str, created: int, *, include_usage: bool = False) -> None:
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._head: bytes | None = None  # the fields every chunk starts with, once the stream id is known
        self._role_sent = False
        self._usage_null = b',"usage":null' if include_usage else b""

    def _chunk(self, stream_id: str, delta: bytes, finish_reason: str | None = None) -> bytes:
        # Compact JSON never holds a raw CR or LF, so each chunk is exactly one data: line (WHATWG HTML §9.2.5).
        head = self._head
        if head is None:
            head = self._head = b'data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s' % (
                json_str(completion_id(stream_id)),
                self._created,
                json_str(self._model),
            )
        if not self._role_sent:
            self._role_sent = True
            delta = b'{"role":"assistant",' + delta[1:] if delta != b"{}" else b'{"role":"assistant"}'
        return b'%s,"choices":[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]%s}\n\n' % (
            head,
            delta,
            b"null" if finish_reason is None else json_str(finish_reason),
            self._usage_null,
        )

    def encode(self, stream_id: str, seq: int, event: Event) -> bytes:
        if isinstance(event, Delta):
            return self._chunk(stream_id, b'{"content":%s}' % json_str(event.content))
        if isinstance(event, Reasoning):
            return self._chunk(stream_id, b'{"reasoning_content":%s}' % json_str(event.content))
        if isinstance(event, Refusal):
            return self._chunk(stream_id, b'{"refusal":%s}' % json_str(event.content))
        if isinstance(event, ToolCallDelta):
            return self._chunk(stream_id, json_bytes({"tool_calls": [_tool_call_delta(event)]}))
        if isinstance(event, Done):
            frame = self._chunk(stream_id, b"{}", _finish_reason(event))
            if self._include_usage:
                usage = b"null" if event.usage is None else json_bytes(event.usage.as_dict())
                assert self._head is not None
                frame += b'%s,"choices":[],"usage":%s}\n\n' % (self._head, usage)
            return frame + _DONE
        # OpenAI ends a failed stream with the error object alone (no [DONE]); the SDKs raise it as APIError.
        return b"data: %s\n\n" % json_bytes(openai_error_body(event))

    def keepalive(self) -> bytes:
        return b": ping\n\n"  # skipped by the openai SDKs' parsers as long as no id: was ever sent (see above)

    def opening(self, stream_id: str, retry_ms: int | None = None) -> bytes:
        return b""  # no stream id in band: an OpenAI client does not resume

    def reconnect_hint(self, retry_ms: int) -> bytes:
        return b""  # a retry: block would crash the SDKs' parsers


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


class OpenAICompletionFraming:
    """The assembled ``chat.completion`` of one response (make one per reader): written whole at the end."""

    name = "openai-completion"
    content_type = "application/json"

    __slots__ = ("_content", "_created", "_model", "_reasoning", "_refusal", "_tool_calls")

    def __init__(self, model: str, created: int) -> None:
        self._model = model
        self._created = created
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._refusal: list[str] = []
        self._tool_calls: dict[int, _ToolCall] = {}

    def encode(self, stream_id: str, seq: int, event: Event) -> bytes:
        if isinstance(event, Delta):
            self._content.append(event.content)
        elif isinstance(event, Reasoning):
            self._reasoning.append(event.content)
        elif isinstance(event, Refusal):
            self._refusal.append(event.content)
        elif isinstance(event, ToolCallDelta):
            call = self._tool_calls.setdefault(event.index, _ToolCall())
            call.id = call.id or event.id
            call.name = call.name or event.name
            call.arguments.append(event.arguments)
        elif isinstance(event, Done):
            return json_bytes(self.completion(stream_id, event))
        # Nothing in band, not even for an Error: the reader answers it with a status (nothing was written yet).
        return b""

    def completion(self, stream_id: str, done: Done) -> dict[str, Any]:
        """The ``chat.completion`` object of everything encoded so far, ended by `done`."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._content) if self._content or not (self._tool_calls or self._refusal) else None,
            "refusal": "".join(self._refusal) if self._refusal else None,
        }
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id or f"call_{index}",
                    "type": "function",
                    "function": {"name": call.name or "", "arguments": "".join(call.arguments)},
                }
                for index, call in sorted(self._tool_calls.items())
            ]
        completion: dict[str, Any] = {
            "id": completion_id(stream_id),
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(done)}],
        }
        if done.usage is not None:
            completion["usage"] = done.usage.as_dict()
        return completion

    def keepalive(self) -> bytes:
        return b""  # never asked for: leading bytes would commit the response to 200 before the outcome is known

    def opening(self, stream_id: str, retry_ms: int | None = None) -> bytes:
        return b""

    def reconnect_hint(self, retry_ms: int) -> bytes:
        return b""
