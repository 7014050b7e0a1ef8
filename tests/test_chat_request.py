"""server/chat_request.py: every validation rule of the JSON body and the query string, and the happy paths.

Every refusal must be a `RequestError` itself (status 400), never a subclass with another status and never a bare
Python exception, which the handler would turn into a 500.
"""

from __future__ import annotations

import doctest
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server.chat_request
from server.chat_request import (
    ChatRequest,
    Message,
    RequestRules,
    ToolCall,
    check_query_encoding,
    from_json_body,
    from_query,
    parse_chat_body,
)
from server.errors import RequestError

RULES = RequestRules(
    default_model="default-model",
    allowed_models=frozenset({"default-model", "other-model"}),
    max_messages=3,
    max_message_chars=10,
    max_total_chars=25,
    max_tokens_cap=100,
)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def user(content: object = "hi") -> dict[str, object]:
    return {"role": "user", "content": content}


def assert_400(exc: BaseException, *words: str) -> None:
    assert type(exc) is RequestError
    assert exc.status == 400
    assert exc.type == "invalid_request"
    message = exc.message  # type: ignore[attr-defined]
    assert message
    for word in words:
        assert word in message, (word, message)


# --- happy paths --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (body(prompt="hello"), ChatRequest((Message("user", "hello"),), "default-model")),
        (body(messages=[user("hello")]), ChatRequest((Message("user", "hello"),), "default-model")),
        (
            body(
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": ""},
                ],
                model="other-model",
                max_tokens=100,
                temperature=2,
            ),
            ChatRequest(
                (Message("system", "be brief"), Message("user", "q1"), Message("assistant", "")),
                "other-model",
                max_tokens=100,
                temperature=2.0,
            ),
        ),
        (body(prompt="x", max_tokens=1, temperature=0), ChatRequest((Message("user", "x"),), "default-model", 1, 0.0)),
        (body(prompt="x", temperature=0.7), ChatRequest((Message("user", "x"),), "default-model", None, 0.7)),
        (body(prompt="x", model=None, max_tokens=None, temperature=None),
         ChatRequest((Message("user", "x"),), "default-model")),
        (body(prompt="x" * 10), ChatRequest((Message("user", "x" * 10),), "default-model")),
        (body(prompt=" x "), ChatRequest((Message("user", " x "),), "default-model")),
        (b'  {"prompt": "x"}\n', ChatRequest((Message("user", "x"),), "default-model")),
        (body(prompt="é😀"), ChatRequest((Message("user", "é😀"),), "default-model")),  # an escaped pair
        ('{"prompt": "é"}'.encode(), ChatRequest((Message("user", "é"),), "default-model")),
        (body(messages=[user("12345"), {"role": "assistant", "content": "1234567890"}, user("1234567890")]),
         ChatRequest((Message("user", "12345"), Message("assistant", "1234567890"), Message("user", "1234567890")),
                     "default-model")),
        (body(messages=[{"role": "user", "content": "x", "name": "ann"}]),
         ChatRequest((Message("user", "x", name="ann"),), "default-model")),
    ],
    ids=["prompt", "messages", "everything", "lower-bounds", "float-temperature", "explicit-nulls",
         "prompt-at-char-limit", "prompt-kept-verbatim", "whitespace-around-json", "unicode", "utf8-raw",
         "total-at-limit", "message-name"],
)  # fmt: skip
def test_json_body_accepted(raw: bytes, expected: ChatRequest) -> None:
    request = from_json_body(raw, RULES)
    assert request == expected
    assert type(request.temperature) is (float if expected.temperature is not None else type(None))


@pytest.mark.parametrize(
    ("messages", "text"),
    [
        ([user("a")], "a"),
        ([user("a"), {"role": "assistant", "content": "b"}, user("c")], "c"),
        ([user("a"), {"role": "assistant", "content": "b"}], "a"),
    ],
    ids=["one", "last-user", "assistant-after-user"],
)
def test_last_user_text(messages: list[dict[str, object]], text: str) -> None:
    assert from_json_body(body(messages=messages), RULES).last_user_text == text


def test_last_user_text_without_user_message() -> None:
    assert ChatRequest((Message("system", "s"),), "m").last_user_text == ""


def short_id(raw: bytes) -> str:
    return repr(raw[:60]) + (f"..{len(raw)}" if len(raw) > 60 else "")


# --- the body's refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        # Not JSON, or not a JSON object.
        (b"", ["JSON"]),
        (b"{", ["JSON"]),
        (b"{'prompt': 'x'}", ["JSON"]),
        (b'{"prompt": "x"} trailing', ["JSON"]),
        (b'{"prompt": "\xff"}', ["JSON"]),
        (b'{"prompt": "\xc3"}', ["JSON"]),
        (b'{"prompt": "\xed\xa0\x80"}', ["JSON"]),  # an encoded surrogate is not UTF-8
        (b"[]", ["object"]),
        (b'"prompt"', ["object"]),
        (b"null", ["object"]),
        (b"42", ["object"]),
        (b"[" * 100_000 + b"]" * 100_000, []),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", []),
        # Shape of the object.
        (body(), ["messages", "prompt"]),
        (body(model="default-model"), ["messages", "prompt"]),
        (body(prompt="x", stream=False), ["stream", "true"]),
        (body(prompt="x", stream="yes"), ["stream", "true or false"]),
        (body(prompt="x", n=2, logprobs=True), ["unknown fields", "'logprobs', 'n'"]),
        (body(prompt="x", Prompt="x"), ["unknown", "Prompt"]),
        (body(prompt="x", messages=[user()]), ["either", "not both"]),
        # prompt.
        (body(prompt=None), ["prompt", "string"]),
        (body(prompt=1), ["prompt", "string"]),
        (body(prompt=["x"]), ["prompt", "string"]),
        (body(prompt=""), ["prompt", "empty"]),
        (body(prompt=" \n\t"), ["prompt", "empty"]),
        (body(prompt="x" * 11), ["prompt", "10"]),
        # messages.
        (body(messages=None), ["messages", "list"]),
        (body(messages="hi"), ["messages", "list"]),
        (body(messages={"role": "user", "content": "x"}), ["messages", "list"]),
        (body(messages=[]), ["messages", "empty"]),
        (body(messages=[user()] * 4), ["messages", "3"]),
        (body(messages=["hi"]), ["messages[0]", "object"]),
        (body(messages=[user(), None]), ["messages[1]", "object"]),
        (body(messages=[{"content": "x"}]), ["messages[0].role"]),
        (body(messages=[{"role": "function", "content": "x"}]),
         ["messages[0].role", "assistant, developer, system, tool, user"]),
        (body(messages=[{"role": "User", "content": "x"}]), ["messages[0].role"]),
        (body(messages=[{"role": None, "content": "x"}]), ["messages[0].role"]),
        (body(messages=[{"role": 1, "content": "x"}]), ["messages[0].role"]),
        (body(messages=[{"role": ["user"], "content": "x"}]), ["messages[0].role"]),
        (body(messages=[{"role": {"user": 1}, "content": "x"}]), ["messages[0].role"]),
        (body(messages=[{"role": "user"}]), ["messages[0].content", "string"]),
        (body(messages=[user(None)]), ["messages[0].content", "string"]),
        (body(messages=[user(["a"])]), ["messages[0].content[0]", "type"]),
        (body(messages=[user(5)]), ["messages[0].content", "string or an array"]),
        (body(messages=[user(), user("x" * 11)]), ["messages[1].content", "10"]),
        (body(messages=[user("1234567890"), user("1234567890"), user("123456")]), ["25"]),
        (body(messages=[{"role": "system", "content": "x"}]), ["user message"]),
        (body(messages=[user(""), {"role": "assistant", "content": "x"}]), ["user message"]),
        (body(messages=[user("  ")]), ["user message"]),
        # Lone surrogates: JSON can escape them, UTF-8 (and so the upstream request) cannot carry them.
        (body(prompt="x \ud800"), ["prompt", "surrogate", "U+D800", "character 2"]),
        (b'{"prompt": "\\ud83d"}', ["prompt", "surrogate", "U+D83D"]),
        (b'{"prompt": "\\ude00\\ud83d"}', ["prompt", "surrogate", "U+DE00", "character 0"]),  # a pair reversed
        (body(messages=[user(), {"role": "assistant", "content": "\udfff"}, user()]),
         ["messages[1].content", "surrogate", "U+DFFF"]),
        # model.
        (body(prompt="x", model="gpt-4"), ["model", "default-model, other-model"]),
        (body(prompt="x", model=""), ["model"]),
        (body(prompt="x", model=1), ["model"]),
        (body(prompt="x", model=["default-model"]), ["model"]),
        (body(prompt="x", model="DEFAULT-MODEL"), ["model"]),
        # max_tokens.
        (body(prompt="x", max_tokens=0), ["max_tokens", "100"]),
        (body(prompt="x", max_tokens=-1), ["max_tokens"]),
        (body(prompt="x", max_tokens=101), ["max_tokens", "100"]),
        (body(prompt="x", max_tokens=10**30), ["max_tokens"]),
        (body(prompt="x", max_tokens=1.0), ["max_tokens", "integer"]),
        (body(prompt="x", max_tokens=1.5), ["max_tokens"]),
        (body(prompt="x", max_tokens="5"), ["max_tokens"]),
        (body(prompt="x", max_tokens=True), ["max_tokens"]),
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", []),  # beyond int()'s 4300-digit limit
        # temperature.
        (body(prompt="x", temperature=-0.1), ["temperature", "0", "2"]),
        (body(prompt="x", temperature=2.0001), ["temperature"]),
        (body(prompt="x", temperature=3), ["temperature"]),
        (body(prompt="x", temperature="1"), ["temperature"]),
        (body(prompt="x", temperature=True), ["temperature"]),
        (body(prompt="x", temperature=False), ["temperature"]),
        (body(prompt="x", temperature=[1]), ["temperature"]),
        (b'{"prompt": "x", "temperature": NaN}', []),
        (b'{"prompt": "x", "temperature": Infinity}', []),
        (b'{"prompt": "x", "temperature": -Infinity}', []),
        (b'{"prompt": "x", "temperature": 1e400}', []),
        (b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", ["temperature"]),  # an int too big for a float
        # resume: a JSON boolean (the query string's "1" and "0" are a query string's).
        (body(prompt="x", resume="1"), ["resume", "true or false"]),
        (body(prompt="x", resume="true"), ["resume"]),
        (body(prompt="x", resume=1), ["resume"]),
    ],
    ids=lambda value: None if isinstance(value, list) else short_id(value),
)  # fmt: skip
def test_json_body_refused(raw: bytes, words: list[str]) -> None:
    with pytest.raises(RequestError) as info:
        from_json_body(raw, RULES)
    assert_400(info.value, *words)


def test_utf16_body_is_not_json() -> None:
    # RFC 8259 §8.1: "JSON text exchanged between systems that are not part of a closed ecosystem MUST be encoded
    # using UTF-8". json.loads(bytes) sniffs UTF-16/32 and would accept this body.
    with pytest.raises(RequestError) as info:
        from_json_body('{"prompt": "hi"}'.encode("utf-16"), RULES)
    assert_400(info.value, "JSON")


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_give_a_request_or_a_400(raw: bytes) -> None:
    try:
        from_json_body(raw, RULES)
    except RequestError as exc:
        assert_400(exc)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "prompt": _JSON_VALUES,
            "messages": st.lists(
                st.fixed_dictionaries({}, optional={"role": _JSON_VALUES | st.sampled_from(["user", "system"]),
                                                    "content": _JSON_VALUES | st.just("hi")}) | _JSON_VALUES,
                max_size=4,
            ) | _JSON_VALUES,
            "model": _JSON_VALUES | st.just("other-model"),
            "max_tokens": _JSON_VALUES,
            "temperature": _JSON_VALUES,
        },
    )
)  # fmt: skip
def test_any_json_object_gives_a_request_or_a_400(fields: dict[str, Any]) -> None:
    raw = json.dumps(fields).encode()  # NaN and Infinity included, as Python's json.loads accepts them
    try:
        request = from_json_body(raw, RULES)
    except RequestError as exc:
        assert_400(exc)
    else:
        assert 1 <= len(request.messages) <= RULES.max_messages
        assert request.model in RULES.allowed_models
        assert request.max_tokens is None or 1 <= request.max_tokens <= RULES.max_tokens_cap
        assert request.temperature is None or 0.0 <= request.temperature <= 2.0


# --- the query string ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"prompt": "hello"}, ChatRequest((Message("user", "hello"),), "default-model")),
        ({"prompt": "x", "model": "other-model"}, ChatRequest((Message("user", "x"),), "other-model")),
        ({"prompt": "x", "max_tokens": "100"}, ChatRequest((Message("user", "x"),), "default-model", 100)),
        ({"prompt": "x", "max_tokens": "1"}, ChatRequest((Message("user", "x"),), "default-model", 1)),
        ({"prompt": "x", "temperature": "0.5"}, ChatRequest((Message("user", "x"),), "default-model", None, 0.5)),
        ({"prompt": "x", "temperature": "2"}, ChatRequest((Message("user", "x"),), "default-model", None, 2.0)),
        ({"prompt": "x", "temperature": "0"}, ChatRequest((Message("user", "x"),), "default-model", None, 0.0)),
        ({"prompt": "x", "temperature": "1e0"}, ChatRequest((Message("user", "x"),), "default-model", None, 1.0)),
        ({"prompt": "x", "temperature": ".5"}, ChatRequest((Message("user", "x"),), "default-model", None, 0.5)),
        ({"prompt": "x", "format": "ndjson"}, ChatRequest((Message("user", "x"),), "default-model")),
        ({"prompt": "x", "resume": "1"}, ChatRequest((Message("user", "x"),), "default-model", resume=True)),
    ],
    ids=["prompt", "model", "max-tokens", "max-tokens-1", "temperature", "temperature-int", "temperature-zero",
         "temperature-exponent", "temperature-leading-dot", "format-is-the-handlers", "resume"],
)  # fmt: skip
def test_query_accepted(query: dict[str, str], expected: ChatRequest) -> None:
    request = from_query(query, RULES)
    assert request == expected
    assert request.temperature is None or type(request.temperature) is float


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ({}, ["prompt", "required"]),
        ({"model": "default-model"}, ["prompt", "required"]),
        ({"prompt": ""}, ["prompt", "empty"]),
        ({"prompt": "   "}, ["prompt", "empty"]),
        ({"prompt": "x" * 11}, ["prompt", "10"]),
        ({"prompt": "x", "model": "gpt-4"}, ["model"]),
        ({"prompt": "x", "model": ""}, ["model"]),
        ({"prompt": "x", "max_tokens": "0"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "101"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "-5"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "1.5"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "10.0"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "1e2"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "abc"}, ["max_tokens", "number"]),
        ({"prompt": "x", "max_tokens": ""}, ["max_tokens", "number"]),
        ({"prompt": "x", "max_tokens": "true"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "nan"}, ["max_tokens"]),
        ({"prompt": "x", "max_tokens": "9" * 5000}, ["max_tokens"]),
        ({"prompt": "x", "temperature": "2.5"}, ["temperature"]),
        ({"prompt": "x", "temperature": "-1"}, ["temperature"]),
        ({"prompt": "x", "temperature": "nan"}, ["temperature"]),
        ({"prompt": "x", "temperature": "inf"}, ["temperature"]),
        ({"prompt": "x", "temperature": "-inf"}, ["temperature"]),
        ({"prompt": "x", "temperature": "1e400"}, ["temperature"]),
        ({"prompt": "x", "temperature": "hot"}, ["temperature", "number"]),
        ({"prompt": "x", "temperature": ""}, ["temperature", "number"]),
        ({"prompt": "x", "temperature": "1" + "0" * 400}, ["temperature"]),  # an int too big for a float
        ({"prompt": "x \udc80"}, ["prompt", "surrogate"]),  # what a surrogateescape decoding would give
        ({"prompt": "x", "n": "2"}, ["unknown query parameter", "'n'"]),
        ({"prompt": "x", "stop": "END", "top_p": "1"}, ["unknown query parameters", "'stop', 'top_p'"]),
        ({"Prompt": "x"}, ["unknown query parameter", "'Prompt'"]),
    ],
    ids=lambda value: ascii(value)[:60],
)
def test_query_refused(query: dict[str, str], words: list[str]) -> None:
    with pytest.raises(RequestError) as info:
        from_query(query, RULES)
    assert_400(info.value, *words)


@settings(max_examples=300, deadline=None)
@given(
    query=st.fixed_dictionaries(
        {"prompt": st.text(max_size=12)},
        optional={
            "model": st.text(max_size=12) | st.just("other-model"),
            "max_tokens": st.text(max_size=12) | st.integers(-10, 200).map(str) | st.floats().map(str),
            "temperature": st.text(max_size=12) | st.integers(-1, 3).map(str) | st.floats().map(str),
        },
    )
)
def test_any_query_gives_a_request_or_a_400(query: dict[str, str]) -> None:
    try:
        request = from_query(query, RULES)
    except RequestError as exc:
        assert_400(exc)
    else:
        assert request.messages == (Message("user", query["prompt"]),)
        assert request.max_tokens is None or 1 <= request.max_tokens <= RULES.max_tokens_cap
        assert request.temperature is None or 0.0 <= request.temperature <= 2.0


@pytest.mark.parametrize(
    "raw",
    ["", "prompt=hi", "prompt=caf%C3%A9+%F0%9F%99%82", "prompt=%EF%BF%BD", "prompt=a%26b&model=x", "prompt=é"],
    ids=["empty", "ascii", "utf8", "a-real-replacement-character", "encoded-ampersand", "raw-non-ascii"],
)
def test_query_encoding_accepted(raw: str) -> None:
    check_query_encoding(raw)


@pytest.mark.parametrize(
    "raw",
    ["prompt=%ED%A0%80", "prompt=x%ED%B0%80y", "prompt=%FF", "prompt=%C3", "prompt=hi&model=%80", "prompt=\udcff"],
    ids=["encoded-high-surrogate", "encoded-low-surrogate", "ff", "truncated", "in-another-field", "escaped-byte"],
)
def test_query_encoding_refused(raw: str) -> None:
    # yarl decodes these with U+FFFD in place of each bad byte; the prompt would not be what the client wrote.
    with pytest.raises(RequestError) as info:
        check_query_encoding(raw)
    assert_400(info.value, "UTF-8")


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(server.chat_request)
    assert tried
    assert not failures


# --- what an OpenAI-compatible client sends -------------------------------------------------------------------------

WIDE = RequestRules(
    default_model="default-model",
    allowed_models=frozenset({"default-model"}),
    max_tokens_cap=100,
    content_part_types=frozenset({"image_url"}),
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
ROUND_TRIP = [
    {"role": "developer", "content": "Use the tools."},
    {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def test_a_tool_round_trip_with_every_field() -> None:
    request = parse_chat_body(
        {
            "model": "default-model",
            "messages": ROUND_TRIP,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": -(2**63),
            "stop": ["\n\n", "END"],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}, "strict": True}},
            "reasoning_effort": "low",
        },
        WIDE,
        shape="openai",
    )
    assert request.messages == (
        Message("developer", "Use the tools."),
        Message("user", "Weather in Paris?"),  # only text parts: one string, as every upstream takes it
        Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
        Message("tool", "18 C, sunny", tool_call_id="call_1"),
    )
    assert request.include_usage
    assert request.stream
    assert request.token_limit == 50
    # What goes upstream: the messages as OpenAI takes them, and every optional field that was set.
    assert [m.as_openai() for m in request.messages] == [
        ROUND_TRIP[0],
        {"role": "user", "content": "Weather in Paris?"},
        *ROUND_TRIP[2:],
    ]
    assert request.upstream_fields() == {
        "max_completion_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": -(2**63),
        "stop": ["\n\n", "END"],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}, "strict": True}},
        "reasoning_effort": "low",
    }


def test_a_plain_request_sets_no_optional_upstream_field() -> None:
    request = parse_chat_body({"messages": [user()]}, WIDE)
    assert request.upstream_fields() == {}
    assert [m.as_openai() for m in request.messages] == [user()]


@pytest.mark.parametrize(
    ("shape", "data", "stream"),
    [("openai", {}, False), ("openai", {"stream": True}, True), ("relay", {}, True), ("relay", {"stream": True}, True)],
    ids=["openai-default", "openai-true", "relay-default", "relay-true"],
)
def test_stream_flag(shape: Any, data: dict[str, Any], stream: bool) -> None:
    assert parse_chat_body({"messages": [user()], **data}, WIDE, shape=shape).stream is stream


def test_the_openai_shape_has_no_prompt_or_resume() -> None:
    for extra in ({"prompt": "x"}, {"resume": True}):
        with pytest.raises(RequestError) as info:
            parse_chat_body({"messages": [user()], **extra}, WIDE, shape="openai")
        assert_400(info.value, "unknown field", next(iter(extra)))


def test_a_configured_part_type_is_passed_on_as_sent_with_the_text_parts() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    request = parse_chat_body({"messages": [user([image])]}, WIDE)
    assert request.messages[0].as_openai() == user([image])
    assert request.last_user_text == ""
    both = [{"type": "text", "text": "What is this?"}, image]
    request = parse_chat_body({"messages": [user(both)]}, WIDE)
    assert request.messages[0].as_openai() == user(both)
    assert request.last_user_text == "What is this?"


def test_the_system_prompt_comes_first() -> None:
    rules = RequestRules(default_model="m", allowed_models=frozenset({"m"}), system_prompt="You are terse.")
    assert from_json_body(body(messages=[{"role": "system", "content": "x"}, user()]), rules).messages == (
        Message("system", "You are terse."),
        Message("system", "x"),
        Message("user", "hi"),
    )
    assert from_query({"prompt": "q"}, rules).messages == (Message("system", "You are terse."), Message("user", "q"))


def _tool_reply(call_id: str = "call_1") -> list[dict[str, Any]]:
    return [
        user(),
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": call_id, "content": "x"},
    ]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        # Messages of the new roles.
        ({"messages": [{"role": "user", "content": "x", "refusal": None}]},
         ["messages[0]", "unknown field", "refusal"]),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, ["messages[0]", "tool_calls"]),
        ({"messages": [user(), {"role": "tool", "content": "x"}]}, ["messages[1].tool_call_id"]),
        ({"messages": _tool_reply("call_2")}, ["messages[2].tool_call_id", "no tool call"]),
        ({"messages": [user(), {"role": "tool", "tool_call_id": "call_1", "content": "x"},
                       {"role": "assistant", "tool_calls": [CALL]}]}, ["messages[1].tool_call_id", "earlier"]),
        ({"messages": [user(), {"role": "assistant", "content": None}]}, ["messages[1].content"]),
        ({"messages": [user(), {"role": "assistant", "tool_calls": []}]}, ["messages[1].tool_calls", "non-empty"]),
        ({"messages": [user(), {"role": "assistant", "tool_calls": [{**CALL, "id": ""}]}]}, ["tool_calls[0].id"]),
        ({"messages": [user(), {"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}]},
         ["tool_calls[0].type"]),
        ({"messages": [user(), {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "a b",
                                                                                        "arguments": "{}"}}]}]},
         ["tool_calls[0].function.name"]),
        ({"messages": [user(), {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f"}}]}]},
         ["tool_calls[0].function.arguments", "string"]),
        ({"messages": [user(), {"role": "assistant", "tool_calls": [{**CALL, "extra": 1}]}]},
         ["tool_calls[0]", "unknown field", "extra"]),
        # Content parts.
        ({"messages": [user([{"type": "image_url", "image_url": {"url": "x"}}])]},
         ["content[0].type", "'image_url'", "accepted: text"]),
        ({"messages": [user([{"type": "text", "text": "x", "cache_control": {}}])]}, ["content[0]", "cache_control"]),
        ({"messages": [user([{"type": "text", "text": 5}])]}, ["content[0].text", "string"]),
        ({"messages": [user([{"text": "x"}])]}, ["content[0]", "type"]),
        ({"messages": [user([{"type": "text", "text": "1234567890"}, {"type": "text", "text": "12345678901"}])]},
         ["messages[0].content", "20"]),
        ({"messages": [user([])]}, ["user message"]),
        # Sampling and limits.
        ({"messages": [user()], "top_p": 1.5}, ["top_p", "0 to 1"]),
        ({"messages": [user()], "top_p": True}, ["top_p"]),
        ({"messages": [user()], "seed": 2**63}, ["seed", "64 bits"]),
        ({"messages": [user()], "seed": 1.0}, ["seed"]),
        ({"messages": [user()], "stop": []}, ["stop", "1 to 4"]),
        ({"messages": [user()], "stop": ["a", "b", "c", "d", "e"]}, ["stop", "1 to 4"]),
        ({"messages": [user()], "stop": [""]}, ["stop", "empty"]),
        ({"messages": [user()], "stop": 5}, ["stop"]),
        ({"messages": [user()], "max_completion_tokens": 0}, ["max_completion_tokens", "100"]),
        ({"messages": [user()], "max_completion_tokens": 5, "max_tokens": 5}, ["not both"]),
        ({"messages": [user()], "reasoning_effort": "extreme"}, ["reasoning_effort", "high, low, medium"]),
        ({"messages": [user()], "stream_options": {"include_usage": "yes"}}, ["stream_options.include_usage"]),
        ({"messages": [user()], "stream_options": {"include_obfuscation": False}},
         ["stream_options", "include_obfuscation"]),
        ({"messages": [user()], "stream_options": True}, ["stream_options"]),
        # Tools.
        ({"messages": [user()], "tools": []}, ["tools", "1 to 128"]),
        ({"messages": [user()], "tools": [WEATHER] * 129}, ["tools", "1 to 128"]),
        ({"messages": [user()], "tools": [WEATHER, WEATHER]}, ["tools[1]", "twice"]),
        ({"messages": [user()], "tools": [{"type": "web_search"}]}, ["tools[0]", "function"]),
        ({"messages": [user()], "tools": [{"type": "function", "function": {"name": "f", "params": {}}}]},
         ["tools[0].function", "params"]),
        ({"messages": [user()], "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
         ["tools[0].function.parameters"]),
        ({"messages": [user()], "tools": [{"type": "function", "function": {"name": "f" * 65}}]},
         ["tools[0].function.name", "64"]),
        ({"messages": [user()], "tool_choice": "required"}, ["tool_choice", "needs tools"]),
        ({"messages": [user()], "tool_choice": "any"}, ["tool_choice"]),
        ({"messages": [user()], "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         ["tool_choice", "'x'", "not one of the tools"]),
        ({"messages": [user()], "parallel_tool_calls": True}, ["parallel_tool_calls", "needs tools"]),
        # response_format.
        ({"messages": [user()], "response_format": {"type": "xml"}}, ["response_format"]),
        ({"messages": [user()], "response_format": {"type": "json_schema"}}, ["response_format.json_schema"]),
        ({"messages": [user()], "response_format": {"type": "json_object", "schema": {}}},
         ["response_format", "schema"]),
        ({"messages": [user()], "response_format": {"type": "json_schema", "json_schema": {"name": "w", "x": 1}}},
         ["response_format.json_schema", "'x'"]),
    ],
    ids=lambda value: None if isinstance(value, list) else short_id(json.dumps(value).encode()),
)  # fmt: skip
def test_openai_fields_refused(data: dict[str, Any], words: list[str]) -> None:
    small = RequestRules(default_model="m", allowed_models=frozenset({"m"}), max_message_chars=20, max_tokens_cap=100)
    with pytest.raises(RequestError) as info:
        parse_chat_body(data, small)
    assert_400(info.value, *words)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {"messages": st.just(ROUND_TRIP)},
        optional=dict.fromkeys(
            ("stream", "stream_options", "max_completion_tokens", "top_p", "seed", "stop", "tools", "tool_choice",
             "parallel_tool_calls", "response_format", "reasoning_effort"),
            _JSON_VALUES,
        ),
    )
)  # fmt: skip
def test_any_openai_fields_give_a_request_or_a_400(fields: dict[str, Any]) -> None:
    try:
        request = parse_chat_body(fields, WIDE, shape="openai")
    except RequestError as exc:
        assert_400(exc)
    else:
        json.dumps(request.upstream_fields())  # whatever is accepted can be sent on


_CALL_IDS = st.sampled_from(["c1", "c2"])
_VALID_MESSAGES = st.one_of(
    st.just(user()),
    st.just({"role": "developer", "content": [{"type": "text", "text": "be brief"}]}),
    st.just(user([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,"}}])),
    _CALL_IDS.map(lambda c: {"role": "assistant", "content": None, "tool_calls": [
        {"id": c, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
    _CALL_IDS.map(lambda c: {"role": "tool", "tool_call_id": c, "content": "result"}),
)  # fmt: skip


@st.composite
def _messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Mostly well-formed conversations (tool calls answered or not, in any order), a field now and then replaced
    by any JSON value or an unknown field added."""
    messages = draw(st.lists(_VALID_MESSAGES, min_size=1, max_size=5))
    for index in draw(st.lists(st.integers(0, len(messages) - 1), max_size=2)):
        message = dict(messages[index])
        key = draw(st.sampled_from([*message, "name", "tool_calls", "tool_call_id", "extra"]))
        message[key] = draw(_JSON_VALUES | _CALL_IDS)
        messages[index] = message
    return messages


@settings(max_examples=400, deadline=None)
@given(messages=_messages(), shape=st.sampled_from(["relay", "openai"]))
def test_any_messages_of_any_role_give_a_request_or_a_400(messages: list[dict[str, Any]], shape: Any) -> None:
    try:
        request = parse_chat_body({"messages": messages}, WIDE, shape=shape)
    except RequestError as exc:
        assert_400(exc)
    else:
        sent = json.loads(json.dumps([m.as_openai() for m in request.messages]))
        # What goes upstream is what was accepted: the roles in order, each tool message answering an earlier call.
        assert [m["role"] for m in sent] == [m["role"] for m in messages]
        called: set[str] = set()
        for message in sent:
            assert message["role"] != "tool" or message["tool_call_id"] in called
            called.update(call["id"] for call in message.get("tool_calls", []))
