"""The relay's shared state, stored on the application under the typed key `RELAY`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from .admission import Limiter
from .chat_request import RequestRules
from .config import Config
from .providers.base import Provider
from .request_origin import OriginPolicy

if TYPE_CHECKING:
    from .stream import RelayStream, StreamSettings


class StreamRegistry:
    """The open streams of one app: counted for /healthz, told to end on shutdown, awaited before cleanup."""

    def __init__(self) -> None:
        self._streams: set[RelayStream] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.finished = 0

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[RelayStream]:
        return iter(list(self._streams))

    def add(self, stream: RelayStream) -> None:
        self._streams.add(stream)
        self._empty.clear()

    def discard(self, stream: RelayStream) -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self.finished += 1
        if not self._streams:
            self._empty.set()

    async def wait_empty(self, grace: float) -> bool:
        """True if every stream ended within `grace` seconds."""
        try:
            async with asyncio.timeout(grace):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True


@dataclass(slots=True)
class RelayState:
    config: Config
    provider: Provider
    rules: RequestRules
    stream_settings: StreamSettings
    limiter: Limiter
    identify: Callable[[web.Request], str]
    origin_policy: OriginPolicy
    streams: StreamRegistry = field(default_factory=StreamRegistry)


RELAY = web.AppKey("llm_relay", RelayState)
