"""Who is asking: the key that admission control counts requests against."""

from __future__ import annotations

from aiohttp import web

from .config import Config


class ClientIdentifier:
    """The client's remote address."""

    @classmethod
    def from_config(cls, config: Config) -> ClientIdentifier:
        return cls()

    def __call__(self, request: web.Request) -> str:
        return request.remote or "unknown"
