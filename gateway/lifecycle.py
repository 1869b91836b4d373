"""Readiness and graceful drain: which chat requests are in flight, and ending them.

On SIGTERM `drain` marks the gateway as draining (/readyz and new requests answer 503),
waits for in-flight requests up to the grace period and cancels what remains; the proxy
turns that cancellation into a final SSE error event. Then the listener closes.
`notify` speaks systemd's sd_notify protocol: one datagram on the unix socket named by NOTIFY_SOCKET, no library needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class Lifecycle:
    def __init__(self, grace_secs: float, notify_socket: str | None = None) -> None:
        self._grace = grace_secs
        self._notify_socket = notify_socket
        self._active: set[asyncio.Task[object]] = set()
        self._idle: asyncio.Event | None = None
        self.draining = False
        self.grace_expired = False

    def enter(self) -> asyncio.Task[object]:
        """The current request is in flight until `leave` (call it in a finally)."""
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        return task

    def leave(self, task: asyncio.Task[object]) -> None:
        self._active.discard(task)
        if not self._active and self._idle is not None:
            self._idle.set()

    async def drain(self) -> None:
        self.draining = True
        if self._active:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), self._grace)
            except TimeoutError:
                self.grace_expired = True
                for task in list(self._active):
                    task.cancel()
                with contextlib.suppress(TimeoutError):  # a handler that ignores cancellation
                    await asyncio.wait_for(asyncio.shield(self._idle.wait()), 5)

    def notify(self, message: str) -> None:
        path = self._notify_socket
        if not path:
            return
        address = "\0" + path[1:] if path.startswith("@") else path  # @: abstract namespace
        # contextlib.suppress: if the manager went away there is nothing to tell.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message.encode(), address)
