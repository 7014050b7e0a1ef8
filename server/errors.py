"""Errors that carry what the HTTP layer needs; only handlers turn them into responses.

    RelayError                 type, status, message, retry_after
    ├── RequestError           400  the client's request is wrong
    │   ├── PayloadTooLarge    413
    │   ├── NotAcceptable      406
    │   ├── MethodNotAllowed   405
    │   ├── NotFound           404
    │   ├── ResumeUnavailable  404  a stream that cannot be resumed here (gone, evicted, expired, elsewhere)
    │   ├── MisdirectedRequest 421  sent to a host name the relay does not answer for (DNS rebinding)
    │   ├── UnsupportedMediaType 415
    │   ├── RequestTimeout     408  the head came, the body did not arrive in time
    │   ├── IncompleteBody     400  the body was cut short (the client went away, or its framing broke)
    │   └── ExpectationFailed  417  an Expect other than 100-continue
    ├── Unauthorized           401
    ├── Forbidden              403  a browser request on behalf of a page that may not start a generation
    ├── RateLimited            429  (limits)
    │   ├── TooManyAuthFailures      429  this address failed to authenticate too often
    │   ├── TokenBudgetExhausted     429  the client's tokens per minute are spent (budget.py)
    │   └── TokenQuotaExhausted      429  the client's daily token quota is spent
    ├── Overloaded             503  (limits: global capacity)
    │   └── OutOfDescriptors         503  the process is at its file-descriptor limit
    ├── UpstreamError          502  the model provider failed
    │   ├── UpstreamUnavailable      502  could not connect / connection lost
    │   ├── UpstreamRateLimited      503  the provider throttled us; Retry-After passed on when known
    │   ├── UpstreamTimeout          504
    │   └── UpstreamProtocolError    502  the provider sent something that is not the chat stream format
    └── StreamTimeout          504  a relay timeout (first token, idle gap, total duration)

Messages are written for the person at the other end: never an exception's text, never a credential.
"""

from __future__ import annotations

from collections.abc import Mapping

from .events import Error


class RelayError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers: Mapping[str, str] = headers or {}

    def to_event(self) -> Error:
        return Error(self.type, self.message)

    def body(self) -> dict[str, object]:
        return {"error": {"type": self.type, "message": self.message}}


class RequestError(RelayError):
    status = 400
    type = "invalid_request"


class PayloadTooLarge(RequestError):
    status = 413
    type = "payload_too_large"


class NotAcceptable(RequestError):
    status = 406
    type = "not_acceptable"


class MethodNotAllowed(RequestError):
    status = 405
    type = "method_not_allowed"


class NotFound(RequestError):
    status = 404
    type = "not_found"


class ResumeUnavailable(NotFound):
    type = "resume_unavailable"


class Unauthorized(RelayError):
    status = 401
    type = "unauthorized"


class RateLimited(RelayError):
    status = 429
    type = "rate_limited"


class TooManyAuthFailures(RateLimited):
    type = "auth_rate_limited"


class TokenBudgetExhausted(RateLimited):
    type = "token_budget_exhausted"


class TokenQuotaExhausted(RateLimited):
    type = "token_quota_exhausted"


class Overloaded(RelayError):
    status = 503
    type = "overloaded"


class OutOfDescriptors(Overloaded):
    type = "server_overloaded"


class UpstreamError(RelayError):
    status = 502
    type = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    type = "upstream_unavailable"


class UpstreamRateLimited(UpstreamError):
    status = 503
    type = "upstream_rate_limited"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    type = "upstream_protocol_error"


class StreamTimeout(RelayError):
    status = 504
    type = "timeout"


class Forbidden(RelayError):
    status = 403
    type = "forbidden"


class MisdirectedRequest(RequestError):
    # RFC 9110 §15.5.20: the server is unwilling to answer for the target URI's authority.
    status = 421
    type = "misdirected_request"


class UnsupportedMediaType(RequestError):
    status = 415
    type = "unsupported_media_type"


class RequestTimeout(RequestError):
    status = 408
    type = "request_timeout"


class IncompleteBody(RequestError):
    type = "incomplete_body"


class ExpectationFailed(RequestError):
    status = 417
    type = "expectation_failed"
