"""Validate what a client asks for and turn it into a `ChatRequest`. No IO.

Two shapes reach us: the query string of ``GET /api/chat?prompt=...`` (all an ``EventSource`` can send) and a JSON
body: ``POST /api/chat`` takes ``{"prompt": "..."}`` or what an OpenAI-compatible client sends to
``/chat/completions`` (`parse_chat_body` is the one function for both, and for the OpenAI-compatible endpoint).
Every field is checked against an allowlist; every rule raises `RequestError` (400) with a message that says what
to change, and a field we do not know is refused by name rather than dropped (a client that sets ``n`` or
``logprobs`` would otherwise get a reply that silently ignores them).

The body, field by field (OpenAI's Chat Completions reference is the source of each shape):

    messages            [{role, content, name?}]: role system, developer, user, assistant or tool; content a string
                        or an array of parts ``{"type": "text", "text"}`` (sent on as one string) and, only when
                        `RequestRules.content_part_types` lists them, other part types such as ``image_url`` (then
                        the array is passed on as sent);
                        assistant messages may carry ``tool_calls`` (then content may be null), tool messages need
                        the ``tool_call_id`` of an earlier assistant tool call
    prompt              (``/api/chat`` only) one user message, instead of messages
    model               one of the allowed models (default: the configured one)
    stream              true (``/api/chat`` always streams; the OpenAI-compatible endpoint also takes false)
    stream_options      ``{"include_usage": bool}``: the relay asks the upstream for usage itself; the client's
                        wish is kept for an endpoint that shows usage only on request
    max_tokens, max_completion_tokens   1 to `RequestRules.max_tokens_cap`, at most one of the two
    temperature (0-2), top_p (0-1), seed (a 64-bit integer), stop (a string or up to 4)
    tools               up to 128 ``{"type": "function", "function": {name, description?, parameters?, strict?}}``
    tool_choice         "none", "auto", "required" or ``{"type": "function", "function": {"name"}}`` of a tool
    parallel_tool_calls a boolean, with tools
    response_format     ``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {name,
                        schema?, strict?, description?}}``
    reasoning_effort    none, minimal, low, medium or high
    resume              (``/api/chat`` only) keep generating for the resume grace after the last reader left

A server-side system prompt (`RequestRules.system_prompt`, ``--system-prompt``) is put before the client's messages.

Text must be Unicode that UTF-8 can carry, since that is how it travels on to the model provider. A JSON string
can spell a lone UTF-16 surrogate (``"\\ud800"``, which JavaScript strings may hold) and a query string can
percent-encode bytes that are not UTF-8 (``%ED%A0%80``, a surrogate's would-be encoding, RFC 3629 §3); both are
refused here rather than failing later, in the provider's client, as a 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import unquote_to_bytes

from .errors import RequestError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high"})
TOOL_CHOICES = frozenset({"none", "auto", "required"})
MAX_TOOLS = 128  # OpenAI's own limit
MAX_STOP = 4  # likewise
# OpenAI's rule for a function's name; vLLM and Ollama accept it too.
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_SEED_RANGE = range(-(2**63), 2**63)

# The fields of each body shape. ``prompt`` and ``resume`` are the relay's own; the rest is OpenAI's.
_OPENAI_KEYS = frozenset(
    {
        "messages", "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
        "top_p", "seed", "stop", "tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort",
    }
)  # fmt: skip
_RELAY_KEYS = _OPENAI_KEYS | {"prompt", "resume"}
_QUERY_KEYS = frozenset({"prompt", "model", "max_tokens", "temperature", "format", "resume"})
_MESSAGE_KEYS: Mapping[str, frozenset[str]] = {
    "system": frozenset({"role", "content", "name"}),
    "developer": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    # Besides its content and tool calls, an assistant message may come back as the SDKs return it (with
    # ``refusal``, ``annotations``, ``audio``, ``function_call`` and DeepSeek's ``reasoning_content``): accepted so
    # that ``messages.append(reply.choices[0].message)`` works, and not sent upstream (see _echoed_assistant_fields).
    "assistant": frozenset({"role", "content", "name", "tool_calls"})
    | {"refusal", "annotations", "audio", "function_call", "reasoning_content"},
    "tool": frozenset({"role", "content", "tool_call_id"}),
}

JSONObject: TypeAlias = dict[str, Any]
BodyShape: TypeAlias = Literal["relay", "openai"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call an assistant message made earlier in the conversation (sent back with its result)."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str  # the text; of an array of parts, its text parts joined
    # The content as the client sent it when it was an array holding other parts than text (relayed as sent);
    # None for a string or only text parts (relayed as `content`, one string).
    parts: tuple[JSONObject, ...] | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def as_openai(self) -> JSONObject:
        """The message as OpenAI's Chat Completions API takes it."""
        message: JSONObject = {"role": self.role}
        if self.parts is not None:
            message["content"] = list(self.parts)
        elif self.content or not self.tool_calls:
            message["content"] = self.content
        else:
            message["content"] = None  # an assistant turn of only tool calls
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: tuple[Message, ...]
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    # Keep the generation running for the resume grace after its last reader leaves, so a reconnect finds it.
    resume: bool = False
    max_completion_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    tools: tuple[JSONObject, ...] | None = None
    tool_choice: str | JSONObject | None = None
    parallel_tool_calls: bool | None = None
    response_format: JSONObject | None = None
    reasoning_effort: str | None = None
    stream: bool = True
    # The client asked for usage (stream_options.include_usage); the relay asks the upstream for it regardless.
    include_usage: bool = False

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return ""

    @property
    def token_limit(self) -> int | None:
        """The most tokens the reply may have, under either name."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def upstream_fields(self) -> JSONObject:
        """The optional fields the client set, as the upstream's ``/chat/completions`` takes them (model, messages,
        stream and stream_options are the provider's)."""
        fields: JSONObject = {}
        for name in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "tool_choice",
                     "parallel_tool_calls", "response_format", "reasoning_effort"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if self.stop is not None:
            fields["stop"] = list(self.stop)
        if self.tools is not None:
            fields["tools"] = list(self.tools)
        return fields


@dataclass(frozen=True, slots=True)
class RequestRules:
    """What a request may ask for."""

    default_model: str
    allowed_models: frozenset[str]
    max_messages: int = 200
    max_message_chars: int = 32_000
    max_total_chars: int = 200_000
    max_tokens_cap: int = 32_768
    # Content part types besides "text" that are passed on as sent (e.g. image_url, input_audio, file).
    content_part_types: frozenset[str] = frozenset()
    # Put before the client's messages as a system message.
    system_prompt: str | None = None


# json.loads joins an escaped surrogate pair into one code point, and strict UTF-8 decoding refuses encoded
# surrogates, so any surrogate code point left in a decoded string is a lone one.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: object, what: str, rules: RequestRules) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{what} must be a string")
    if len(value) > rules.max_message_chars:
        raise RequestError(f"{what} is longer than {rules.max_message_chars} characters")
    lone = _SURROGATE.search(value)
    if lone is not None:
        raise RequestError(
            f"{what} holds a lone UTF-16 surrogate (U+{ord(lone.group()):04X} at character {lone.start()}), "
            "which is not Unicode text: send well-formed strings (String.prototype.toWellFormed() in JavaScript)"
        )
    return value


def _model(value: object, rules: RequestRules) -> str:
    if value is None:
        return rules.default_model
    if not isinstance(value, str) or value not in rules.allowed_models:
        allowed = ", ".join(sorted(rules.allowed_models))
        raise RequestError(f"model must be one of: {allowed}")
    return value


def _max_tokens(value: object, rules: RequestRules, name: str = "max_tokens") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= rules.max_tokens_cap:
        raise RequestError(f"{name} must be an integer from 1 to {rules.max_tokens_cap}")
    return value


def _query_number(query: Mapping[str, str], name: str) -> int | float | None:
    """A number from the query string; the same range checks as JSON then apply."""
    text = query.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise RequestError(f"{name} must be a number") from None


def _temperature(value: object) -> float | None:
    if value is None:
        return None
    # Compare before converting: float(10**400) overflows, and NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise RequestError("temperature must be a number from 0 to 2")
    return float(value)


def _prompt_messages(prompt: object, rules: RequestRules) -> tuple[Message, ...]:
    text = _check_text(prompt, "prompt", rules)
    if not text.strip():
        raise RequestError("prompt must not be empty")
    return (Message("user", text),)


def _echoed_assistant_fields(item: JSONObject, where: str) -> str | None:
    """Check the fields an SDK's own assistant message carries besides content and tool calls; returns its
    refusal. They describe an earlier reply and are not sent upstream: DeepSeek refuses ``reasoning_content`` in
    input messages, and a refusal or annotations change nothing the model needs."""
    refusal = item.get("refusal")
    if refusal is not None and not isinstance(refusal, str):
        raise RequestError(f"{where}.refusal must be a string or null")
    if item.get("annotations") is not None and not isinstance(item.get("annotations"), list):
        raise RequestError(f"{where}.annotations must be a list or null")
    for key in ("audio", "function_call"):
        if item.get(key) is not None:
            raise RequestError(f"{where}.{key} is not supported; send null or leave it out")
    reasoning = item.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RequestError(f"{where}.reasoning_content must be a string or null")
    return refusal


def _messages(value: object, rules: RequestRules) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise RequestError("messages must be a list of {role, content} objects")
    if not value:
        raise RequestError("messages must not be empty")
    if len(value) > rules.max_messages:
        raise RequestError(f"messages may hold at most {rules.max_messages} items")
    messages: list[Message] = []
    total = 0
    call_ids: set[str] = set()  # the ids of the tool calls made so far: a tool message answers one of them
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object with role and content")
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"{where}.role must be one of: {', '.join(sorted(ROLES))}")
        _refuse_unknown(item, _MESSAGE_KEYS[role], where)
        tool_calls = _message_tool_calls(item.get("tool_calls"), where, rules) if role == "assistant" else ()
        refusal = _echoed_assistant_fields(item, where) if role == "assistant" else None
        raw_content = item.get("content")
        if raw_content is None and (tool_calls or refusal):
            # OpenAI: an assistant's content is optional when it has tool calls or is a refusal.
            content, parts = "", None
        else:
            content, parts = _content(raw_content, f"{where}.content", role, rules)
        name = _optional_text(item.get("name"), f"{where}.name", rules)
        tool_call_id = None
        if role == "tool":
            tool_call_id = item.get("tool_call_id")
            if not isinstance(tool_call_id, str) or not tool_call_id:
                raise RequestError(f"{where}.tool_call_id must be the id of the tool call this message answers")
            if tool_call_id not in call_ids:
                raise RequestError(f"{where}.tool_call_id names no tool call of an earlier assistant message")
        call_ids.update(c.id for c in tool_calls)
        total += len(content) + sum(len(c.arguments) for c in tool_calls)
        messages.append(Message(role, content, parts, name, tool_calls, tool_call_id))
    if total > rules.max_total_chars:
        raise RequestError(f"messages hold more than {rules.max_total_chars} characters in all")
    if not any(m.role == "user" and (m.content.strip() or _has_other_parts(m)) for m in messages):
        raise RequestError("messages must contain a non-empty user message")
    return tuple(messages)


def _has_other_parts(message: Message) -> bool:
    return message.parts is not None and any(p["type"] != "text" for p in message.parts)


def _refuse_unknown(data: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise RequestError(f"{where} has unknown field{'s' if len(unknown) > 1 else ''}: {names}")


def _optional_text(value: object, what: str, rules: RequestRules) -> str | None:
    return None if value is None else _check_text(value, what, rules)


def _content(value: object, what: str, role: str, rules: RequestRules) -> tuple[str, tuple[JSONObject, ...] | None]:
    """A message's content: a string, or an array of parts (text, and the configured other types)."""
    if isinstance(value, str):
        return _check_text(value, what, rules), None
    if not isinstance(value, list):
        raise RequestError(f"{what} must be a string or an array of content parts")
    if len(value) > rules.max_messages:
        raise RequestError(f"{what} may hold at most {rules.max_messages} parts")
    texts: list[str] = []
    parts: list[JSONObject] = []
    for index, part in enumerate(value):
        where = f"{what}[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"{where} must be an object with a type")
        kind = part["type"]
        if kind == "text":
            _refuse_unknown(part, frozenset({"type", "text"}), where)
            texts.append(_check_text(part.get("text"), f"{where}.text", rules))
            parts.append({"type": "text", "text": texts[-1]})
        elif kind in rules.content_part_types and role == "user":
            parts.append(part)  # configured: the upstream knows this type; it is passed on as sent
        else:
            accepted = ", ".join(sorted({"text"} | (rules.content_part_types if role == "user" else set())))
            raise RequestError(f"{where}.type {kind!r} is not accepted here (accepted: {accepted})")
    text = "".join(texts)
    if len(text) > rules.max_message_chars:
        raise RequestError(f"{what} is longer than {rules.max_message_chars} characters")
    if len(texts) == len(parts):
        # Only text: sent on as one string, which says the same to the model, because several upstreams take only
        # a string (DeepSeek's API, older Ollama and vLLM servers refuse an array of parts).
        return text, None
    return text, tuple(parts)


def _message_tool_calls(value: object, where: str, rules: RequestRules) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where}.tool_calls must be a non-empty array of tool calls")
    if len(value) > MAX_TOOLS:
        raise RequestError(f"{where}.tool_calls may hold at most {MAX_TOOLS} calls")
    calls: list[ToolCall] = []
    for index, call in enumerate(value):
        at = f"{where}.tool_calls[{index}]"
        if not isinstance(call, dict):
            raise RequestError(f"{at} must be an object with id, type and function")
        _refuse_unknown(call, frozenset({"id", "type", "function"}), at)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise RequestError(f"{at}.id must be a non-empty string")
        _check_text(call_id, f"{at}.id", rules)
        if call.get("type", "function") != "function":
            raise RequestError(f"{at}.type must be function")
        function = call.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{at}.function must be an object with name and arguments")
        _refuse_unknown(function, frozenset({"name", "arguments"}), f"{at}.function")
        name = _function_name(function.get("name"), f"{at}.function.name")
        arguments = _check_text(function.get("arguments"), f"{at}.function.arguments", rules)
        calls.append(ToolCall(call_id, name, arguments))
    return tuple(calls)


def _function_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _FUNCTION_NAME.fullmatch(value):
        raise RequestError(f"{what} must be 1 to 64 letters, digits, underscores or dashes")
    return value


def _number(value: object, name: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    # Compare before converting: float(10**400) overflows, and NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _seed(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in _SEED_RANGE:
        raise RequestError("seed must be an integer that fits in 64 bits")
    return value


def _stop(value: object, rules: RequestRules) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_STOP:
        raise RequestError(f"stop must be a string or an array of 1 to {MAX_STOP} strings")
    stops = tuple(_check_text(item, "stop", rules) for item in items)
    if not all(stops):
        raise RequestError("stop sequences must not be empty")
    return stops


def _tools(value: object) -> tuple[JSONObject, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOLS:
        raise RequestError(f"tools must be an array of 1 to {MAX_TOOLS} tools")
    tools: list[JSONObject] = []
    names: set[str] = set()
    for index, tool in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(f'{where} must be an object with "type": "function" and a function')
        _refuse_unknown(tool, frozenset({"type", "function"}), where)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function must be an object with a name")
        _refuse_unknown(function, frozenset({"name", "description", "parameters", "strict"}), f"{where}.function")
        name = _function_name(function.get("name"), f"{where}.function.name")
        if name in names:
            raise RequestError(f"{where}.function.name {name!r} is declared twice")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise RequestError(f"{where}.function.description must be a string")
        if not isinstance(function.get("parameters", {}), dict):
            raise RequestError(f"{where}.function.parameters must be a JSON Schema object")
        if not isinstance(function.get("strict", False), bool):
            raise RequestError(f"{where}.function.strict must be true or false")
        tools.append(tool)
    return tuple(tools)


def _tool_choice(value: object, tools: tuple[JSONObject, ...] | None) -> str | JSONObject | None:
    if value is None:
        return None
    if isinstance(value, str) and value in TOOL_CHOICES:
        if value == "required" and not tools:
            raise RequestError('tool_choice "required" needs tools')
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        _refuse_unknown(value, frozenset({"type", "function"}), "tool_choice")
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or set(function) != {"name"} or not isinstance(name, str):
            raise RequestError('tool_choice.function must be {"name": ...}')
        if not any(t["function"]["name"] == name for t in tools or ()):
            raise RequestError(f"tool_choice names {name!r}, which is not one of the tools")
        return value
    raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name"}}')


def _response_format(value: object) -> JSONObject | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(value, dict) or kind not in ("text", "json_object", "json_schema"):
        raise RequestError('response_format must be {"type": "text"}, {"type": "json_object"} or a json_schema')
    if kind != "json_schema":
        _refuse_unknown(value, frozenset({"type"}), "response_format")
        return value
    _refuse_unknown(value, frozenset({"type", "json_schema"}), "response_format")
    schema = value.get("json_schema")
    if not isinstance(schema, dict):
        raise RequestError("response_format.json_schema must be an object with a name")
    _refuse_unknown(schema, frozenset({"name", "description", "schema", "strict"}), "response_format.json_schema")
    _function_name(schema.get("name"), "response_format.json_schema.name")
    if not isinstance(schema.get("schema", {}), dict):
        raise RequestError("response_format.json_schema.schema must be a JSON Schema object")
    if not isinstance(schema.get("strict", False), bool | None):
        raise RequestError("response_format.json_schema.strict must be true or false")
    return value


def _choice(value: object, name: str, allowed: frozenset[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in allowed:
        raise RequestError(f"{name} must be one of: {', '.join(sorted(allowed))}")
    return value


def _flag(value: object, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise RequestError(f"{name} must be true or false")


def _include_usage(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise RequestError('stream_options must be an object such as {"include_usage": true}')
    _refuse_unknown(value, frozenset({"include_usage"}), "stream_options")
    return bool(_flag(value.get("include_usage"), "stream_options.include_usage"))


def _with_system_prompt(messages: tuple[Message, ...], rules: RequestRules) -> tuple[Message, ...]:
    if not rules.system_prompt:
        return messages
    return (Message("system", rules.system_prompt), *messages)


def _resume_flag(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise RequestError("resume must be true or false (1 or 0 in a query string)")


def check_query_encoding(raw_query: str) -> None:
    """Refuse a query string whose percent-encoded bytes are not UTF-8 (RFC 3986 §2.5: URIs encode text as UTF-8).

    aiohttp (yarl) decodes them with replacement, so without this check ``%ED%A0%80`` would reach the model as
    three U+FFFD characters, a prompt the client never wrote.

    >>> check_query_encoding("prompt=caf%C3%A9+%F0%9F%99%82")
    >>> check_query_encoding("prompt=%ED%A0%80")
    Traceback (most recent call last):
    ...
    server.errors.RequestError: the query string is not valid UTF-8 once percent-decoded (RFC 3986 §2.5)
    """
    try:
        unquote_to_bytes(raw_query).decode("utf-8")
    except UnicodeError:  # bytes that are not UTF-8, or characters that cannot be encoded as UTF-8
        raise RequestError("the query string is not valid UTF-8 once percent-decoded (RFC 3986 §2.5)") from None


def from_query(query: Mapping[str, str], rules: RequestRules) -> ChatRequest:
    """The request of ``GET /api/chat?prompt=...&model=...&max_tokens=...&temperature=...``.

    ``format`` (the framing, read by the handler) and ``resume`` are the other parameters; any other is refused by
    name, as an unknown body field is.
    """
    unknown = sorted(set(query) - _QUERY_KEYS)
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise RequestError(f"unknown query parameter{'s' if len(unknown) > 1 else ''}: {names}")
    prompt = query.get("prompt")
    if prompt is None:
        raise RequestError("the prompt query parameter is required")
    return ChatRequest(
        messages=_with_system_prompt(_prompt_messages(prompt, rules), rules),
        model=_model(query.get("model"), rules),
        max_tokens=_max_tokens(_query_number(query, "max_tokens"), rules),
        temperature=_temperature(_query_number(query, "temperature")),
        resume=_resume_flag(query.get("resume")),
    )


def from_json_body(body: bytes, rules: RequestRules) -> ChatRequest:
    """The request of ``POST /api/chat`` with a JSON body: decoded strictly, then `parse_chat_body`."""
    try:
        # Decode strictly ourselves: json.loads(bytes) sniffs UTF-16/32 and passes encoded surrogates through.
        data = json.loads(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError, JSONDecodeError, and int()'s 4300-digit limit
        raise RequestError("the body is not valid JSON") from None
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None
    return parse_chat_body(data, rules)


def parse_chat_body(data: object, rules: RequestRules, *, shape: BodyShape = "relay") -> ChatRequest:
    """The validated `ChatRequest` of a decoded JSON body, or a `RequestError` (400) that says what to change.

    `data` is what ``json.loads`` made of the body (any value: a non-object is refused); `rules` are the server's
    (`RequestRules`: the allowed models, the size bounds, the extra content part types, the system prompt, which
    is put first). `shape` is the endpoint's body:

    - ``"relay"`` (``POST /api/chat``): OpenAI's fields (see the module docstring) plus ``prompt`` (instead of
      ``messages``) and ``resume``; ``stream`` may only be true.
    - ``"openai"`` (an OpenAI-compatible ``/chat/completions``): OpenAI's fields only; ``messages`` is required
      and ``stream`` may be false (`ChatRequest.stream`; default false there, as OpenAI's).

    Every field outside the shape's allowlist is refused, naming them all.

    >>> rules = RequestRules(default_model="m", allowed_models=frozenset({"m"}), system_prompt="Be brief.")
    >>> request = parse_chat_body({"messages": [{"role": "user", "content": "Hi"}], "stream": True}, rules)
    >>> [(m.role, m.content) for m in request.messages], request.model, request.stream
    ([('system', 'Be brief.'), ('user', 'Hi')], 'm', True)
    >>> parse_chat_body({"messages": [], "n": 2, "logprobs": True}, rules, shape="openai")
    Traceback (most recent call last):
    ...
    server.errors.RequestError: unknown fields: 'logprobs', 'n'
    """
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(data) - (_RELAY_KEYS if shape == "relay" else _OPENAI_KEYS))
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''}: {names}")
    if "messages" in data and "prompt" in data:
        raise RequestError("send either messages or prompt, not both")
    if "messages" in data:
        messages = _messages(data["messages"], rules)
    elif "prompt" in data:
        messages = _prompt_messages(data["prompt"], rules)
    else:
        raise RequestError("the body needs messages" + (" (or prompt)" if shape == "relay" else ""))
    stream = _flag(data.get("stream"), "stream")
    if stream is None:
        stream = shape == "relay"
    elif not stream and shape == "relay":
        raise RequestError("stream must be true here: this endpoint always streams")
    max_tokens = _max_tokens(data.get("max_tokens"), rules)
    max_completion_tokens = _max_tokens(data.get("max_completion_tokens"), rules, "max_completion_tokens")
    if max_tokens is not None and max_completion_tokens is not None:
        raise RequestError("send max_completion_tokens or max_tokens (its older name), not both")
    tools = _tools(data.get("tools"))
    parallel = _flag(data.get("parallel_tool_calls"), "parallel_tool_calls")
    if parallel is not None and not tools:
        raise RequestError("parallel_tool_calls needs tools")
    return ChatRequest(
        messages=_with_system_prompt(messages, rules),
        model=_model(data.get("model"), rules),
        max_tokens=max_tokens,
        temperature=_temperature(data.get("temperature")),
        resume=bool(_flag(data.get("resume"), "resume")),  # JSON has booleans: "1" is no more true than 1 is
        max_completion_tokens=max_completion_tokens,
        top_p=_number(data.get("top_p"), "top_p", 0, 1),
        seed=_seed(data.get("seed")),
        stop=_stop(data.get("stop"), rules),
        tools=tools,
        tool_choice=_tool_choice(data.get("tool_choice"), tools),
        parallel_tool_calls=parallel,
        response_format=_response_format(data.get("response_format")),
        reasoning_effort=_choice(data.get("reasoning_effort"), "reasoning_effort", REASONING_EFFORTS),
        stream=stream,
        include_usage=_include_usage(data.get("stream_options")),
    )
