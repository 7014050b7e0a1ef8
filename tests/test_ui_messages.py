"""useChat's request body turned into an OpenAI-shaped chat body (server/ui_messages.py)."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import RequestError
from server.ui_messages import MAX_CHAT_ID_CHARS, parse_chat_id, ui_chat_body


def body(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "chat-1", "messages": list(messages), "trigger": "submit-message", "messageId": None, **extra}


def user(*texts: str) -> dict[str, Any]:
    return {"id": "u", "role": "user", "parts": [{"type": "text", "text": t} for t in texts]}


def test_text_parts_and_the_other_fields() -> None:
    """The transport's fields are taken; the others go on to the chat request's allowlist as they are."""
    chat = ui_chat_body(body(user("Hello, ", "world"), model="m", temperature=0.5, frobnicate=1))
    assert chat.chat_id == "chat-1"
    assert chat.body == {
        "model": "m",
        "temperature": 0.5,
        "frobnicate": 1,
        "messages": [{"role": "user", "content": "Hello, world"}],
    }


def test_page_only_parts_are_dropped() -> None:
    assistant = {
        "id": "a",
        "role": "assistant",
        "parts": [
            {"type": "step-start"},
            {"type": "reasoning", "text": "thinking", "state": "done"},
            {"type": "text", "text": "Answer", "state": "done"},
            {"type": "source-url", "sourceId": "s", "url": "https://example.com"},
            {"type": "data-weather", "data": {"t": 1}},
        ],
    }
    chat = ui_chat_body(body(user("q"), assistant, user("again")))
    assert chat.body["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Answer"},
        {"role": "user", "content": "again"},
    ]


def test_tool_parts_become_tool_calls_and_tool_messages_per_step() -> None:
    assistant = {
        "id": "a",
        "role": "assistant",
        "parts": [
            {"type": "step-start"},
            {"type": "text", "text": "Let me look."},
            {
                "type": "tool-get_weather",
                "toolCallId": "call_1",
                "state": "output-available",
                "input": {"city": "Paris"},
                "output": {"sky": "sunny"},
            },
            {
                "type": "dynamic-tool",
                "toolName": "lookup",
                "toolCallId": "call_2",
                "state": "output-error",
                "input": {},
                "errorText": "no network",
            },
            {"type": "step-start"},
            {"type": "text", "text": "It is sunny."},
        ],
    }
    chat = ui_chat_body(body(user("weather?"), assistant))
    assert chat.body["messages"] == [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky":"sunny"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "no network"},
        {"role": "assistant", "content": "It is sunny."},
    ]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ([], "must be a JSON object"),
        ({"messages": [user("x")]}, "id (the chat id)"),
        (body(user("x"), trigger="resume-stream"), "trigger must be one of"),
        (body(), "messages must be a non-empty list"),
        (body({"role": "tool", "parts": []}), "messages[0].role"),
        (body({"role": "user", "parts": "hi"}), "messages[0].parts must be a list"),
        (body({"role": "user", "parts": [{"type": "file", "url": "x", "mediaType": "image/png"}]}), "'file' part"),
        (body({"role": "user", "parts": [{"text": "no type"}]}), "must be an object with a type"),
        (body({"role": "user", "parts": [{"type": "text", "text": 3}]}), "text must be a string"),
        (
            body({"role": "assistant", "parts": [{"type": "tool-f", "toolCallId": "c", "state": "input-available"}]}),
            "has no output yet",
        ),
        (body({"role": "assistant", "parts": [{"type": "dynamic-tool", "toolCallId": "c"}]}), "its tool's name"),
        (body({"role": "assistant", "parts": [{"type": "tool-f", "state": "output-available"}]}), "toolCallId"),
    ],
    ids=[
        "not-object",
        "no-id",
        "trigger",
        "no-messages",
        "role",
        "parts",
        "file",
        "untyped",
        "text",
        "no-output",
        "nameless",
        "no-call-id",
    ],
)
def test_refusals(data: Any, words: str) -> None:
    with pytest.raises(RequestError, match=None) as caught:
        ui_chat_body(data)
    assert words in caught.value.message


def test_chat_ids() -> None:
    assert parse_chat_id("a" * MAX_CHAT_ID_CHARS) == "a" * MAX_CHAT_ID_CHARS
    for bad in ("", "a" * (MAX_CHAT_ID_CHARS + 1), "a\nb", 7, None):
        with pytest.raises(RequestError):
            parse_chat_id(bad)
