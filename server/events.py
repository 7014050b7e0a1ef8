"""The one event model that flows from a provider, through a stream, to a framing.

A provider yields batches of these values; a framing turns each into bytes. Nothing here does IO.

    Delta(content)                  a piece of the reply, in order
    Done(finish_reason, usage)      the reply is complete (terminal)
    Error(type, message)            the stream failed (terminal)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


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
    """A piece of generated text."""

    content: str


@dataclass(frozen=True, slots=True)
class Done:
    """The generation finished. `finish_reason` is the upstream's (``stop``, ``length``…) when known."""

    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """The generation failed. `type` is a stable machine-readable code; `message` is safe to show a user."""

    type: str
    message: str


Event: TypeAlias = Delta | Done | Error
TerminalEvent: TypeAlias = Done | Error


def is_terminal(event: Event) -> bool:
    return not isinstance(event, Delta)
