"""Server-Sent Events: an incremental parser, the encoder, and the in-stream error event.

Our own small module rather than aiohttp-sse-client: that client reconnects and re-POSTs
when a stream ends or breaks (a duplicated, billed LLM call) and hides upstream error
bodies. The parser is fed raw reads in any split and yields whole events.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GatewayError

DONE = b"[DONE]"
EVENT_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")  # how an SSE body can begin


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # the event block as received (line endings normalised to \n), with its blank line
    data: bytes | None  # the data lines joined with \n; None for comment-only blocks


class EventTooLarge(ValueError):
    """One event grew past the parser's limit before its end arrived (a hostile or broken
    upstream): the relay ends the stream with an error event instead of holding more."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upstream event larger than {limit} bytes")
        self.limit = limit


MAX_EVENT_BYTES = 16 * 1024 * 1024
BOM = b"\xef\xbb\xbf"


class SSEParser:
    """Feed bytes as they arrive; get back the events they complete.

    Handles \\n, \\r\\n and \\r line endings (a \\r\\n split across two reads included),
    multi-line `data:`, comments and events split across reads. Each byte is looked at a
    bounded number of times, however many reads an event arrives in: what is pending is
    only appended to, and only a read (plus the byte before it) is searched for the blank
    line that ends an event. An event still incomplete past `max_event_bytes` raises
    `EventTooLarge`: memory stays bounded whatever the upstream sends. A UTF-8 byte order
    mark opening the stream is dropped, as the SSE spec's decoding (EventSource) drops it:
    kept, it would hide the first event's `data:` line from the gateway and not from them.
    """

    __slots__ = ("_cr", "_head", "_limit", "pending")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        # An incomplete event; never holds a blank line (\\n\\n). Read, not written, outside: how
        # long the events a read completes may be is its length and the read's.
        self.pending = bytearray()
        self._cr = False  # the previous read ended in \\r: a \\n opening the next is its pair
        self._head: bytes | None = b""  # the stream's first bytes while they may be a BOM; None after
        self._limit = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        return parse_blocks(self.complete(chunk))

    def complete(self, chunk: bytes) -> bytes:
        """The whole event blocks this read completes, as one bytes (line endings normalised,
        each block ending in a blank line); b"" while an event is still incomplete."""
        if self._head is not None:
            chunk = self._head + chunk
            if len(chunk) < len(BOM) and BOM.startswith(chunk):
                self._head = chunk  # b"\\xef" alone: the read that follows says whether a BOM opens the stream
                return b""
            self._head = None
            if chunk.startswith(BOM):
                chunk = chunk[len(BOM) :]
        pending = self.pending
        # bytes.find, not `in`: for `b"x" in data` CPython first tries b"x" as an integer and
        # builds a TypeError it then drops, which costs more than the search on a short read.
        if not pending and not self._cr and chunk.endswith(b"\n\n") and chunk.find(b"\r") < 0:
            return chunk  # whole events, nothing carried over: a live stream's usual read
        if not chunk:
            return b""  # and a \r pending stays pending: the \n that may pair it is still to come
        if self._cr:
            self._cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if chunk.find(b"\r") >= 0:
            self._cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # Where the last blank line ends: in this read, else across the boundary (a \n ending
        # what was pending and one opening this read); what is pending holds none.
        end = chunk.rfind(b"\n\n") + 2
        if end == 1 and not (pending.endswith(b"\n") and chunk.startswith(b"\n")):
            if len(pending) + len(chunk) > self._limit:
                # The stream cannot go on; free what it held now, in place: this frame (with
                # `pending`) lives on in the error's traceback until the cycle collector runs.
                pending.clear()
                raise EventTooLarge(self._limit)
            pending += chunk
            return b""
        if not pending:
            self.pending = bytearray(chunk[end:])
            return chunk[:end] if end < len(chunk) else chunk
        pending += chunk[:end]
        blocks = bytes(pending)
        self.pending = bytearray(chunk[end:])
        return blocks

    def close(self) -> list[Event]:
        """End of input: a final block without its blank line is still dispatched."""
        rest, self.pending = (self._head or b"") + bytes(self.pending), bytearray()
        self._cr, self._head = False, None
        event = _parse_block(rest.rstrip(b"\n"))
        return [event] if event is not None else []


def parse_blocks(blocks: bytes) -> list[Event]:
    """Events from whole blocks (what `complete` returns)."""
    return [event for block in blocks.split(b"\n\n") if (event := _parse_block(block)) is not None]


def _parse_block(block: bytes) -> Event | None:
    # A leading \n belongs to a run of blank lines (\n\n\n): no event there.
    block = block.lstrip(b"\n")
    if not block:
        return None
    if block.startswith(b"data: ") and block.find(b"\n") < 0:  # the common one-line event
        return Event(block + b"\n\n", block[6:])
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if name == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    return Event(block + b"\n\n", b"\n".join(data) if data else None)


def event_name(raw: bytes) -> bytes | None:
    """The event's name: its last `event:` line's value (one leading space dropped), as SSE
    decoders read it; None without one. `raw`: an `Event.raw`."""
    at = raw.rfind(b"\nevent:")
    start = at + 7 if at >= 0 else 6 if raw.startswith(b"event:") else -1
    if start < 0:
        return None
    end = raw.find(b"\n", start)
    value = raw[start:end]
    return value[1:] if value.startswith(b" ") else value


def encode(data: bytes) -> bytes:
    """One event from a payload; a multi-line payload becomes several data lines."""
    if data.find(b"\n") >= 0:
        return b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"
    return b"data: " + data + b"\n\n"


def error_event(error: GatewayError) -> bytes:
    return encode(error.body())
