"""Plain, frozen values passed between the layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from opentelemetry.trace import Span


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str  # stays in the process (keyed mode: the configured name; open mode: the key)
    public_id: str  # what may leave the process: logs, traces, Redis keys (hashed if asked)
    rate_key: str  # token-bucket key: "key:<tenant>" or "ip:<peer>:<path>"
    sender: str = ""  # who holds a share of the body budget: "key:<tenant>" or "ip:<peer>"


@dataclass(frozen=True, slots=True)
class Decision:
    """A quota verdict; HTTP status and headers are decided at the edge."""

    allowed: bool
    limit: int
    remaining: int
    reset_after_ms: int


@dataclass(frozen=True, slots=True)
class TokenDecision:
    """A token-budget verdict (SPEC §14) and, when admitted, the reservation to settle."""

    allowed: bool
    limit: int
    remaining: int  # what is left after this request's reservation (refused: before it)
    reset_after_ms: int
    reserved: int  # tokens held for this request (0 when refused)
    key: str  # the store's key and the window the tokens are held in: a settle names both
    window: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


# No reply counts more tokens; past it an upstream's number is no count. Unbounded, one reply of
# 2**63 made tokens_total useless (a float64 counter no longer moves by a request's tokens) and
# each such span failed OTLP's int64 with a traceback on stderr.
MAX_TOKEN_COUNT = 10**15


def is_count(value: object) -> TypeGuard[int]:
    """An upstream's token count: an int (not a bool, not a float) from 0 to MAX_TOKEN_COUNT."""
    return type(value) is int and 0 <= value <= MAX_TOKEN_COUNT


@dataclass(slots=True)
class RequestState:
    """What one request learns on its way through; read by telemetry at the end."""

    request_id: str
    tenant: Tenant | None = None
    decision: Decision | None = None
    tokens: TokenDecision | None = None  # the token budget's verdict and reservation
    model: str | None = None
    stream: bool = False
    usage_chunk: bool = False  # a chat stream whose client asked stream_options.include_usage
    upstream_ttfb: float | None = None  # seconds
    usage: Usage | None = None
    # The input tokens a reply that never finished reported (Anthropic's message_start): in
    # tokens_total when no final usage came, the prompt having been read all the same.
    prompt_tokens_seen: int | None = None
    response_model: str | None = None
    span: Span | None = None  # the server span, when tracing is on
    client_gone: bool = False  # the client hung up before the response was complete
    # The status of a response written to its last byte by the handler itself (a stream, a
    # large reply): a hang-up after it (while the token budget settles) is no disconnect.
    delivered: int | None = None
    answering: bool = False  # a stream's headers are going out: the answer has begun
    payload: dict[str, Any] | None = None  # the body parsed: a JSON object (the body step checks)
    upstream: str | None = None  # ROUTES_FILE's upstream that answered: x-gateway-upstream
    ended: bool = False  # the middleware chain is done with it: no error can follow
    # A 200 stream whose answer was an error event (a 5xx's or a 400's, in the stream): nothing
    # was generated, and its token reservation is released as an error status's is (SPEC §14).
    error_answer: bool = False
    # A reply that failed after its answer began, answered with the gateway's error (events
    # joined for a request without "stream" that end in an error or before their last event):
    # tokens were generated, so its reservation settles as the same stream's live, not as an
    # error status's: to the usage that came, else the estimate stands (SPEC §14).
    generated: bool = False
    # The message of the gateway's error event that ended a stream after its 200 went out (the
    # upstream broke, fell silent, the drain's grace ran out): in the request's log line.
    stream_error: str | None = None
    # The request is on its way to an upstream (redacted, encoded): from here it may be billed.
    # A client that leaves before cancels a request nothing generated for (SPEC §14).
    sent: bool = False
