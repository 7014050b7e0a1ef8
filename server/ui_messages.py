"""The body ``useChat`` sends (AI SDK 5+, ``DefaultChatTransport``) turned into a chat body in OpenAI's shape. No IO.

    {"id": chat id, "messages": [UI message…], "trigger": "submit-message" | "regenerate-message",
     "messageId"?: …, and any field of the chat request (the transport's ``body``): "model"?, "resume"?, …}

A UI message is ``{"id", "role": "system" | "user" | "assistant", "parts": [...]}``. Its parts become OpenAI
messages as the SDK's own ``convertToModelMessages`` does it, for the parts a chat completion can carry:

* ``text`` parts are the message's content, in order;
* ``reasoning`` parts are dropped (providers do not take a model's reasoning back);
* an assistant message's tool parts (``tool-<name>`` and ``dynamic-tool``) become its ``tool_calls``, each followed
  by a ``tool`` message with its output (``output-available``), its ``errorText`` (``output-error``) or a denial
  (``output-denied``); ``step-start`` parts split an assistant message into one assistant message per step;
* ``source-url``, ``source-document`` and ``data-*`` parts are for the page only and are dropped.

Anything else is refused with a `RequestError` naming it (``file`` parts, a tool call without its output). The
fields other than the transport's own go on, as they are, to the chat request's allowlist (`server/chat_request.py`),
which refuses those it does not know by name, as on every endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .errors import RequestError
from .json_wire import json_bytes

__all__ = ["MAX_CHAT_ID_CHARS", "UIChat", "parse_chat_id", "ui_chat_body"]

MAX_CHAT_ID_CHARS: Final = 256
_TRANSPORT_KEYS: Final = frozenset({"id", "messages", "trigger", "messageId"})
_TRIGGERS: Final = frozenset({"submit-message", "regenerate-message"})
_ROLES: Final = frozenset({"system", "user", "assistant"})
_PAGE_ONLY_PARTS: Final = frozenset({"source-url", "source-document", "step-start", "reasoning"})


@dataclass(frozen=True, slots=True)
class UIChat:
    """A ``useChat`` request: its chat id, and the chat body in OpenAI's shape for `server/chat_request.py`."""

    chat_id: str
    body: dict[str, Any]


def parse_chat_id(value: object) -> str:
    """A chat id as ``useChat`` makes it (any non-empty string without control characters, bounded).

    >>> parse_chat_id("Xk2f9QeLm0a1b2c3")
    'Xk2f9QeLm0a1b2c3'
    """
    if not isinstance(value, str) or not value:
        raise RequestError("id (the chat id) must be a non-empty string")
    if len(value) > MAX_CHAT_ID_CHARS:
        raise RequestError(f"id (the chat id) is longer than {MAX_CHAT_ID_CHARS} characters")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise RequestError("id (the chat id) must not contain control characters")
    return value


def ui_chat_body(data: object) -> UIChat:
    """The chat id and OpenAI-shaped body of a decoded ``useChat`` request body; `RequestError` if it is not one."""
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    chat_id = parse_chat_id(data.get("id"))
    trigger = data.get("trigger", "submit-message")
    if trigger not in _TRIGGERS:
        raise RequestError(f"trigger must be one of: {', '.join(sorted(_TRIGGERS))}")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of UI messages ({id, role, parts})")
    converted: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        converted += _message(message, f"messages[{index}]")
    body: dict[str, Any] = {key: value for key, value in data.items() if key not in _TRANSPORT_KEYS}
    body["messages"] = converted
    return UIChat(chat_id, body)


def _message(message: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object with role and parts")
    role = message.get("role")
    if role not in _ROLES:
        raise RequestError(f"{where}.role must be one of: {', '.join(sorted(_ROLES))}")
    parts = message.get("parts")
    if not isinstance(parts, list):
        raise RequestError(f"{where}.parts must be a list")
    if role == "assistant":
        return _assistant(parts, where)
    texts: list[str] = []
    for index, part in enumerate(parts):
        kind = _part_type(part, f"{where}.parts[{index}]")
        if kind == "text":
            texts.append(_text(part, f"{where}.parts[{index}]"))
        elif not _page_only(kind):
            raise RequestError(f"{where}.parts[{index}]: a {role} message cannot carry a {kind!r} part here")
    return [{"role": role, "content": "".join(texts)}]


def _assistant(parts: list[Any], where: str) -> list[dict[str, Any]]:
    """One assistant message per step (``step-start`` parts split them), each followed by its tool results."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []

    def end_step() -> None:
        if calls:
            out.append({"role": "assistant", "content": "".join(texts) or None, "tool_calls": list(calls)})
            out.extend(results)
        elif texts:
            out.append({"role": "assistant", "content": "".join(texts)})
        texts.clear()
        calls.clear()
        results.clear()

    for index, part in enumerate(parts):
        here = f"{where}.parts[{index}]"
        kind = _part_type(part, here)
        if kind == "step-start":
            end_step()
        elif kind == "text":
            texts.append(_text(part, here))
        elif kind == "dynamic-tool" or kind.startswith("tool-"):
            call, result = _tool(part, kind, here)
            calls.append(call)
            results.append(result)
        elif not _page_only(kind):
            raise RequestError(f"{here}: an assistant message cannot carry a {kind!r} part here")
    end_step()
    return out


def _tool(part: dict[str, Any], kind: str, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tool part as an OpenAI tool call and the ``tool`` message with its result."""
    name = part.get("toolName") if kind == "dynamic-tool" else kind.removeprefix("tool-")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}: a tool part needs its tool's name")
    call_id = part.get("toolCallId")
    if not isinstance(call_id, str) or not call_id:
        raise RequestError(f"{where}.toolCallId must be a non-empty string")
    state = part.get("state")
    if state == "output-available":
        output = part.get("output")
        result = output if isinstance(output, str) else json_bytes(output).decode()
    elif state == "output-error":
        error = part.get("errorText")
        result = error if isinstance(error, str) else "the tool failed"
    elif state == "output-denied":
        result = "the user denied this tool call"
    else:
        raise RequestError(f"{where}: tool call {call_id} has no output yet (state {state!r}); send it with its output")
    arguments = json_bytes(part.get("input", {})).decode()
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return call, {"role": "tool", "tool_call_id": call_id, "content": result}


def _part_type(part: object, where: str) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(f"{where} must be an object with a type")
    kind: str = part["type"]
    return kind


def _page_only(kind: str) -> bool:
    return kind in _PAGE_ONLY_PARTS or kind.startswith("data-")


def _text(part: dict[str, Any], where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{where}.text must be a string")
    return text
