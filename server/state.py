"""The relay's shared state, stored on the application under the typed key `RELAY`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .admission import Limiter
from .budget_backends import TokenBudgets
from .chat_request import RequestRules
from .config import Config
from .generation import GenerationSettings
from .providers.base import Provider
from .reader import ReaderSettings
from .registry import StreamRegistry
from .request_origin import OriginPolicy


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
    # Token budgets (budget_backends.py), None when no client has one.
    budgets: TokenBudgets | None = None


RELAY = web.AppKey("llm_relay", RelayState)
