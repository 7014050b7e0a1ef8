"""server/responses.py: the JSON error response's status and headers."""

from __future__ import annotations

import json

import pytest

from server.errors import Overloaded, RateLimited, RelayError, RequestError, UpstreamRateLimited
from server.generation import ServerShuttingDown
from server.responses import error_response


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [
        (UpstreamRateLimited("the model provider is rate limiting this relay"), "1"),  # it sent no Retry-After
        (ServerShuttingDown("the server is restarting; try again shortly"), "1"),
        (RateLimited("slow down", retry_after=7.2), "8"),
        (Overloaded("busy", retry_after=0.4), "1"),
        (RequestError("bad"), None),
    ],
    ids=["upstream-429-without-hint", "shutdown", "rate-limited", "overloaded", "400"],
)
def test_every_429_and_503_says_when_to_retry(error: RelayError, retry_after: str | None) -> None:
    response = error_response(error)
    assert response.headers.get("Retry-After") == retry_after
    assert response.content_type == "application/json"
    assert response.body is not None
    assert json.loads(bytes(response.body))["error"]["type"] == error.type
