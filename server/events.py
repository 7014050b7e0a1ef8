"""The one event model that flows from a provider, through a generation and its log, to a framing.

A provider yields batches of these values; a framing turns each into bytes; a store keeps them as plain dicts
(`to_dict` / `from_dict`). Nothing here does IO.

    Delta(content)                          a piece of the answer's text, in order
    Reasoning(content)                      a piece of the model's reasoning (DeepSeek ``reasoning_content``,
                                            vLLM/Groq ``reasoning``), shown apart from the answer
    ToolCallDelta(index, id, name, arguments)
                                            a piece of a tool call: the first piece of call `index` carries
                                            its id and name, later pieces add to its JSON arguments
    Refusal(content)                        a piece of a refusal (OpenAI ``refusal``) instead of an answer
    Done(finish_reason, usage)              the reply is complete (terminal)
    Error(type, message)                    the stream failed (terminal)

Every event but the two terminal ones is *progress*: it feeds the first-token and idle clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts, when the upstream reports them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of generated answer text."""

    content: str


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of the model's reasoning, streamed before (or between) pieces of the answer."""

    content: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call number `index` (0-based, as the upstream numbers them).

    The first piece of a call names it (`id`, `name`); `arguments` is a fragment of its JSON arguments, to be
    concatenated in order. Fields a piece does not carry are None (id, name) or empty (arguments).
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A piece of the model's refusal to answer."""

    content: str


@dataclass(frozen=True, slots=True)
class Done:
    """The generation finished. `finish_reason` is the upstream's (``stop``, ``length``, ``tool_calls``…) when known."""

    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """The generation failed. `type` is a stable machine-readable code; `message` is safe to show a user."""

    type: str
    message: str


Progress: TypeAlias = Delta | Reasoning | ToolCallDelta | Refusal
TerminalEvent: TypeAlias = Done | Error
Event: TypeAlias = Delta | Reasoning | ToolCallDelta | Refusal | Done | Error


def is_terminal(event: Event) -> bool:
    return isinstance(event, (Done, Error))


def text_size(event: Event) -> int:
    """The characters of model output an event carries (used to bound logs, never reported as exact bytes)."""
    if isinstance(event, (Delta, Reasoning, Refusal)):
        return len(event.content)
    if isinstance(event, ToolCallDelta):
        return len(event.arguments) + len(event.id or "") + len(event.name or "")
    if isinstance(event, Error):
        return len(event.message)
    return 0


def to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict that `from_dict` turns back into an equal event (what a shared store keeps).

    >>> to_dict(ToolCallDelta(0, "call_1", "get_weather", '{"ci'))
    {'kind': 'tool_call', 'index': 0, 'id': 'call_1', 'name': 'get_weather', 'arguments': '{"ci'}
    >>> from_dict(to_dict(Done("stop", Usage(3, 4, 7)))) == Done("stop", Usage(3, 4, 7))
    True
    """
    if isinstance(event, Delta):
        return {"kind": "delta", "content": event.content}
    if isinstance(event, Reasoning):
        return {"kind": "reasoning", "content": event.content}
    if isinstance(event, ToolCallDelta):
        return {
            "kind": "tool_call",
            "index": event.index,
            "id": event.id,
            "name": event.name,
            "arguments": event.arguments,
        }
    if isinstance(event, Refusal):
        return {"kind": "refusal", "content": event.content}
    if isinstance(event, Done):
        return {
            "kind": "done",
            "finish_reason": event.finish_reason,
            "usage": None if event.usage is None else event.usage.as_dict(),
        }
    return {"kind": "error", "type": event.type, "message": event.message}


def from_dict(data: dict[str, Any]) -> Event:
    """The event `to_dict` made. Raises ValueError (KeyError, TypeError included) on anything else."""
    kind = data["kind"]
    if kind == "delta":
        return Delta(_str(data["content"]))
    if kind == "reasoning":
        return Reasoning(_str(data["content"]))
    if kind == "tool_call":
        index = data["index"]
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError("a tool call's index must be an integer")
        return ToolCallDelta(
            index, _opt_str(data.get("id")), _opt_str(data.get("name")), _str(data.get("arguments", ""))
        )
    if kind == "refusal":
        return Refusal(_str(data["content"]))
    if kind == "done":
        usage = data.get("usage")
        return Done(
            _opt_str(data.get("finish_reason")),
            None if usage is None else Usage(usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]),
        )
    if kind == "error":
        return Error(_str(data["type"]), _str(data["message"]))
    raise ValueError(f"unknown event kind {kind!r}")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _opt_str(value: object) -> str | None:
    return None if value is None else _str(value)
