"""The relay's shared state, stored on the application under the typed key `RELAY`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from .admission import Limiter
from .budget_backends import TokenBudgets
from .chat_request import RequestRules
from .config import Config
from .generation import GenerationSettings
from .observe import StreamObserver
from .providers.base import Provider
from .reader import ReaderSettings
from .registry import StreamRegistry
from .request_origin import OriginPolicy

if TYPE_CHECKING:
    from .redis_streams import RedisStreamStore


@dataclass(slots=True)
class RelayState:
    config: Config
    provider: Provider
    rules: RequestRules
    generation_settings: GenerationSettings
    reader_settings: ReaderSettings
    limiter: Limiter
    identify: Callable[[web.Request], str]
    origin_policy: OriginPolicy
    streams: StreamRegistry
    # Told of streams, readers and refusals (server/observe.py): metrics, the upstream failure log.
    observer: StreamObserver = field(default_factory=StreamObserver)
    # --stream-store redis: this instance's generations shared, other instances' read (None: memory only).
    shared_streams: RedisStreamStore | None = None
    # Token budgets (budget_backends.py), None when no client has one.
    budgets: TokenBudgets | None = None


RELAY = web.AppKey("llm_relay", RelayState)
