"""The AI SDK's UI message stream, protocol v1 (what ``useChat`` reads). Pure: no aiohttp, no asyncio.

Every part is one SSE block ``data: {json}`` (header ``x-vercel-ai-ui-message-stream: v1``), the schema being the
``ai`` package's ``uiMessageChunkSchema`` (``ai/src/ui-message-stream/ui-message-chunks.ts``). One reply reads:

    start                        start-step
    text-start {id}              text-delta {id, delta}…          text-end {id}
    reasoning-start {id}         reasoning-delta {id, delta}…     reasoning-end {id}
    tool-input-start {toolCallId, toolName}   tool-input-delta {toolCallId, inputTextDelta}…
    tool-input-available {toolCallId, toolName, input}   (or tool-input-error when the arguments are not JSON)
    finish-step                  finish {finishReason}            data: [DONE]

A failure is ``error {errorText}`` then ``[DONE]`` (the SDK's ``Chat`` sets its status to error). The SDK's state
machine refuses a delta for a part that was not started (``UIMessageStreamError``), so the encoder keeps which part
is open: a run of text is one text part, a run of reasoning one reasoning part, and a change of kind ends the open
part first. A refusal has no part of its own in the protocol: it is text. A tool call's input is announced whole
(``tool-input-available``, parsed) at the end of the step, when its arguments are complete.

This state is per response: a handler makes one `UIMessageStreamFraming` per reader. A resume replays the stream
from its start (the SDK's ``DefaultChatTransport`` treats a resumed stream as a replay), so a fresh encoder
rebuilds the same parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Final

from .events import Delta, Done, Error, Event, Reasoning, Refusal, ToolCallDelta
from .json_wire import json_bytes, json_str

__all__ = ["UI_STREAM_HEADERS", "UIMessageStreamFraming", "ui_finish_reason"]

# The header that tells the AI SDK which protocol the body speaks.
UI_STREAM_HEADERS: Final = {"x-vercel-ai-ui-message-stream": "v1"}

_DONE: Final = b"data: [DONE]\n\n"
# OpenAI's finish reasons and the SDK's (its `finish` part's enum).
_FINISH_REASONS: Final = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
    "content_filter": "content-filter",
}


def ui_finish_reason(finish_reason: str | None) -> str:
    """The ``finish`` part's reason for an upstream's finish reason.

    >>> ui_finish_reason("tool_calls"), ui_finish_reason(None), ui_finish_reason("eos")
    ('tool-calls', 'stop', 'other')
    """
    if finish_reason is None:
        return "stop"
    return _FINISH_REASONS.get(finish_reason, "other")


def _part(payload: dict[str, object]) -> bytes:
    return b"data: %s\n\n" % json_bytes(payload)


@dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


class UIMessageStreamFraming:
    """UI message stream parts for one response (make one per reader)."""

    name = "ui"
    content_type = "text/event-stream; charset=utf-8"

    __slots__ = ("_delta_head", "_open", "_parts", "_started", "_tool_calls")

    def __init__(self) -> None:
        self._started = False
        self._open: str | None = None  # "text" or "reasoning": the kind of the part now open
        self._delta_head = b""  # the open part's delta prefix, built once per part
        self._parts = 0  # parts started so far, to number their ids
        self._tool_calls: dict[int, _ToolCall] = {}

    def encode(self, stream_id: str, seq: int, event: Event) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            # No messageId: the client names its messages (useChat keeps the id of an assistant message that a
            # reply continues, as after a tool result; a server-chosen id would rename it).
            out = b'data: {"type":"start"}\n\ndata: {"type":"start-step"}\n\n'
        if isinstance(event, (Delta, Refusal)):
            return out + self._delta("text", event.content)
        if isinstance(event, Reasoning):
            return out + self._delta("reasoning", event.content)
        if isinstance(event, ToolCallDelta):
            return out + self._close() + self._tool_call(event)
        out += self._close()
        if isinstance(event, Done):
            out += self._tool_inputs()
            out += b'data: {"type":"finish-step"}\n\n'
            return out + _part({"type": "finish", "finishReason": ui_finish_reason(event.finish_reason)}) + _DONE
        assert isinstance(event, Error)
        return out + _part({"type": "error", "errorText": event.message}) + _DONE

    def _delta(self, kind: str, text: str) -> bytes:
        out = b""
        if self._open != kind:
            out = self._close()
            self._parts += 1
            part_id = f"{kind[0]}{self._parts}"
            self._open = kind
            self._delta_head = b'data: {"type":"%s-delta","id":"%s","delta":' % (kind.encode(), part_id.encode())
            out += b'data: {"type":"%s-start","id":"%s"}\n\n' % (kind.encode(), part_id.encode())
        if not text:
            return out
        return out + self._delta_head + json_str(text) + b"}\n\n"

    def _close(self) -> bytes:
        kind = self._open
        if kind is None:
            return b""
        self._open = None
        return b'data: {"type":"%s-end","id":"%s%d"}\n\n' % (kind.encode(), kind[:1].encode(), self._parts)

    def _tool_call(self, event: ToolCallDelta) -> bytes:
        call = self._tool_calls.get(event.index)
        out = b""
        if call is None:
            call = self._tool_calls[event.index] = _ToolCall(event.id or f"call_{event.index}", event.name or "")
            out = _part({"type": "tool-input-start", "toolCallId": call.id, "toolName": call.name})
        if event.arguments:
            call.arguments.append(event.arguments)
            out += _part({"type": "tool-input-delta", "toolCallId": call.id, "inputTextDelta": event.arguments})
        return out

    def _tool_inputs(self) -> bytes:
        """Each tool call's complete input, parsed; arguments that are not JSON are a ``tool-input-error``."""
        out = b""
        for _, call in sorted(self._tool_calls.items()):
            text = "".join(call.arguments)
            try:
                value = json.loads(text) if text.strip() else {}
            except (ValueError, RecursionError):  # JSONDecodeError, int()'s digit limit, nesting too deep
                out += _part(
                    {
                        "type": "tool-input-error",
                        "toolCallId": call.id,
                        "toolName": call.name,
                        "input": text,
                        "errorText": "the model's tool call arguments are not valid JSON",
                    }
                )
                continue
            out += _part({"type": "tool-input-available", "toolCallId": call.id, "toolName": call.name, "input": value})
        self._tool_calls.clear()
        return out

    def keepalive(self) -> bytes:
        return b": ping\n\n"  # an SSE comment: the SDK's parser (eventsource-parser) skips it

    def opening(self, stream_id: str, retry_ms: int | None = None) -> bytes:
        return b""

    def reconnect_hint(self, retry_ms: int) -> bytes:
        return b""
