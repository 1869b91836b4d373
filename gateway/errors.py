"""The one error hierarchy and its OpenAI-shaped rendering.

Every error the gateway itself produces is a `GatewayError`; `rendered_errors`, which
wraps every route, renders it as `{"error": {"message", "type", "code"}}`, and
`sse.error_event` renders the same body as a final event once a stream has started.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import orjson

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_RETRY_SOON: Mapping[str, str] = MappingProxyType({"Retry-After": "1"})


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    message = "internal gateway error"

    def __init__(
        self, message: str | None = None, headers: Mapping[str, str] | None = None, code: str | None = None
    ) -> None:
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        self.headers = headers if headers is not None else _NO_HEADERS
        super().__init__(self.message)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)

    overload = False  # load shedding and draining: Anthropic's 529 on /v1/messages (SPEC §11)
    hang_up = False  # the connection is closed after the answer, the rest of the request unread

    def anthropic(self) -> tuple[int, bytes]:
        """Status and body in Anthropic's shape (SPEC §11): overload and draining are 529; any
        other 503 (every upstream's circuit open, the quota store down) stays 503."""
        status = 529 if self.overload else self.status
        return status, orjson.dumps(
            {"type": "error", "error": {"type": anthropic_error_type(status), "message": self.message}}
        )


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(message: str, type_: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidApiKey(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    message = "invalid api key"


class PermissionDenied(GatewayError):
    """Refused by a Cedar policy (SPEC §15); the message names the denying policies."""

    status = 403
    type = "permission_error"
    code = "permission_denied"
    message = "permission denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    message = "not found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    message = "method not allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    message = "the request body did not arrive in time"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    message = "rate limit exceeded"


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "quota_exceeded"


class Overloaded(GatewayError):
    status = 503
    overload = True
    type = "server_error"
    code = "server_overloaded"
    message = "server overloaded"


class StoreUnavailable(GatewayError):
    """The quota store did not answer; raised by stores, rendered as 503 in fail-closed mode."""

    status = 503
    type = "server_error"
    code = "store_unavailable"
    message = "quota store unavailable"

    def __init__(
        self, message: str | None = None, headers: Mapping[str, str] | None = None, code: str | None = None
    ) -> None:
        # The store is skipped for a second after a failure (stores.StoreGuard): try again then.
        super().__init__(message, _RETRY_SOON if headers is None else headers, code)


class KeyUnavailable(StoreUnavailable):
    """The part of the store holding one key did not answer while the rest may (a Redis Cluster
    master down): the fail mode applies to the calls on that key, the store is not skipped for
    everyone (stores.StoreGuard)."""


class ShuttingDown(GatewayError):
    status = 503
    overload = True
    type = "server_error"
    code = "shutting_down"
    message = "gateway is shutting down"


class ModelNotFound(GatewayError):
    """No route of ROUTES_FILE matches the request's model (SPEC §13)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, why: str = "is not routed by this gateway") -> None:
        shown = model[:128] if model.isprintable() else repr(model[:128])
        super().__init__(f"The model '{shown}' {why}")


class UpstreamUnavailable(GatewayError):
    """Every upstream of the model's route is skipped: circuit open, or a Retry-After."""

    status = 503
    type = "server_error"
    code = "circuit_open"
    message = "upstream unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"
    message = "upstream request failed"


class UpstreamReplyTooLarge(UpstreamError):
    """A reply read whole, or the chat chunks made of it, past its API's limit (upstream.py)."""

    message = "upstream reply too large"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    message = "upstream timed out"


class UpstreamAuthRejected(UpstreamError):
    message = "the upstream rejected the gateway's credentials"
    code = "upstream_auth_rejected"


class UpstreamStreamBroken(UpstreamError):
    message = "upstream stream ended unexpectedly"
    code = "upstream_stream_broken"


class UpstreamIdleTimeout(UpstreamError):
    status = 504
    code = "upstream_idle_timeout"
    message = "upstream idle timeout"


class LogprobsUnavailable(BadRequest):
    code = "logprobs_unavailable"
    message = (
        "logprobs are unavailable while the gateway redacts PII: log probabilities repeat the completion's "
        "tokens one by one, which the gateway cannot redact; ask without logprobs/top_logprobs"
    )
