"""Validate what a client asks for and turn it into a `ChatRequest`. No IO.

Two shapes reach us: the query string of ``GET /api/chat?prompt=...`` (all an ``EventSource`` can send) and the
JSON body of ``POST /api/chat``: ``{"messages": [{"role", "content"}, ...], "model"?, "max_tokens"?,
"temperature"?}`` or ``{"prompt": "..."}``. Every rule here raises `RequestError` with a message that says
what to change.

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
from urllib.parse import unquote_to_bytes

from .errors import RequestError

ROLES = frozenset({"system", "user", "assistant"})
_BODY_KEYS = frozenset({"messages", "prompt", "model", "max_tokens", "temperature", "resume"})


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: tuple[Message, ...]
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    # Keep the generation running for the resume grace after its last reader leaves, so a reconnect finds it.
    resume: bool = False

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return ""


@dataclass(frozen=True, slots=True)
class RequestRules:
    """What a request may ask for."""

    default_model: str
    allowed_models: frozenset[str]
    max_messages: int = 200
    max_message_chars: int = 32_000
    max_total_chars: int = 200_000
    max_tokens_cap: int = 32_768


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


def _max_tokens(value: object, rules: RequestRules) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= rules.max_tokens_cap:
        raise RequestError(f"max_tokens must be an integer from 1 to {rules.max_tokens_cap}")
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


def _messages(value: object, rules: RequestRules) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise RequestError("messages must be a list of {role, content} objects")
    if not value:
        raise RequestError("messages must not be empty")
    if len(value) > rules.max_messages:
        raise RequestError(f"messages may hold at most {rules.max_messages} items")
    messages: list[Message] = []
    total = 0
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise RequestError(f"messages[{index}] must be an object with role and content")
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"messages[{index}].role must be one of: {', '.join(sorted(ROLES))}")
        content = _check_text(item.get("content"), f"messages[{index}].content", rules)
        total += len(content)
        messages.append(Message(str(role), content))
    if total > rules.max_total_chars:
        raise RequestError(f"messages hold more than {rules.max_total_chars} characters in all")
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise RequestError("messages must contain a non-empty user message")
    return tuple(messages)


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
    """The request of ``GET /api/chat?prompt=...&model=...&max_tokens=...&temperature=...``."""
    prompt = query.get("prompt")
    if prompt is None:
        raise RequestError("the prompt query parameter is required")
    return ChatRequest(
        messages=_prompt_messages(prompt, rules),
        model=_model(query.get("model"), rules),
        max_tokens=_max_tokens(_query_number(query, "max_tokens"), rules),
        temperature=_temperature(_query_number(query, "temperature")),
        resume=_resume_flag(query.get("resume")),
    )


def from_json_body(body: bytes, rules: RequestRules) -> ChatRequest:
    """The request of ``POST /api/chat`` with a JSON body."""
    try:
        # Decode strictly ourselves: json.loads(bytes) sniffs UTF-16/32 and passes encoded surrogates through.
        data = json.loads(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError, JSONDecodeError, and int()'s 4300-digit limit
        raise RequestError("the body is not valid JSON") from None
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    unknown = set(data) - _BODY_KEYS
    if unknown:
        raise RequestError(f"unknown field: {sorted(unknown)[0]}")
    if "messages" in data and "prompt" in data:
        raise RequestError("send either messages or prompt, not both")
    if "messages" in data:
        messages = _messages(data["messages"], rules)
    elif "prompt" in data:
        messages = _prompt_messages(data["prompt"], rules)
    else:
        raise RequestError("the body needs messages (or prompt)")
    return ChatRequest(
        messages=messages,
        model=_model(data.get("model"), rules),
        max_tokens=_max_tokens(data.get("max_tokens"), rules),
        temperature=_temperature(data.get("temperature")),
        resume=_resume_flag(data.get("resume")),
    )
