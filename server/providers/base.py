from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from ..chat_request import ChatRequest
from ..events import Event


class Provider(Protocol):
    """A source of chat replies.

    `stream` yields batches: every event that became available at once (one network read from an upstream can
    hold many chunks), so that the relay writes them in one go. The last batch ends with a terminal event
    (`Done` or `Error`), or the generator raises a `RelayError`. Closing the generator early must release the
    upstream at once: the relay closes it the moment a client leaves.
    """

    name: str

    def stream(self, request: ChatRequest) -> AsyncGenerator[Sequence[Event], None]: ...

    async def aclose(self) -> None: ...
