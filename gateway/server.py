"""Serving: the event loop (uvloop when installed), signals, sd_notify, and WORKERS.

SIGTERM/SIGINT drain and exit 0; SIGHUP is logged and otherwise ignored (reserved for
reload). With WORKERS=N the parent forks N workers that share the port (SO_REUSEPORT)
and forwards termination signals to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from .app import create_app
from .config import Settings
from .keys import LIFECYCLE
from .lifecycle import Lifecycle

log = logging.getLogger("gateway")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class ListenError(Exception):
    """The address could not be bound (in use, not ours, no permission)."""


def run(settings: Settings) -> int:
    if settings.workers > 1:
        return _supervise(settings)
    return _run_one(settings)


def _settle_gc() -> None:
    """Tune the cyclic garbage collector for serving, once start-up is done.

    What start-up built (modules, the app, the SDKs, the pools) lives as long as the process,
    yet every full collection walked it again: on the bench, collections took ~0.5 ms and ran
    every 16-19 requests, 25-35 µs a request. Frozen, it is never scanned again. And the young
    generation is collected every 10,000 allocations instead of 700: a request's objects are
    freed by reference counting anyway, so frequent collections only re-walk the survivors."""
    gc.collect()  # start-up's garbage goes now, not into the frozen set
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _run_one(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is pinned, but the gateway runs without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, on_ready))
    return 0


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    app = create_app(settings)
    lifecycle = app[LIFECYCLE]
    # handler_cancellation: a client that hangs up cancels its handler, and so the upstream call.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.listen_host,
        settings.listen_port,
        backlog=2048,
        reuse_port=settings.workers > 1 or None,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {settings.listen_host}:{settings.listen_port}: {exc.strerror}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("SIGHUP ignored (reserved for reload)"))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # a worker blocked them until now
    _settle_gc()
    log.info("serving on %s:%s", settings.listen_host, settings.listen_port)
    lifecycle.notify("READY=1")
    if on_ready is not None:
        on_ready()
    await stop.wait()
    lifecycle.notify("STOPPING=1")
    log.info("draining (grace %ss)", settings.shutdown_grace_secs)
    # The listener stays open while draining so that /readyz and new requests get a clear
    # 503 (load balancers see it) instead of a refused connection; in-flight requests finish.
    await lifecycle.drain()
    await runner.cleanup()  # closes the listener, then cleanup_ctx


def _supervise(settings: Settings) -> int:
    """Fork the workers; only this parent speaks to systemd (NotifyAccess=main): READY=1
    once every worker serves, STOPPING=1 when it passes a stop signal on."""
    notifier = Lifecycle(0, settings.notify_socket)
    worker_settings = dataclasses.replace(settings, notify_socket=None)
    ready_read, ready_write = os.pipe()
    children: list[int] = []
    for _ in range(settings.workers):
        # Blocked until the worker's loop handles them, so an early SIGTERM drains, not kills.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)

            def tell_parent() -> None:
                os.write(ready_write, b".")

            code = 1
            try:
                code = _run_one(worker_settings, on_ready=tell_parent)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        children.append(pid)
    os.close(ready_write)

    def forward(signum: int, _frame: object) -> None:
        notifier.notify("STOPPING=1")
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ready = 0
    while ready < settings.workers and (byte := os.read(ready_read, 1)):
        ready += len(byte)
    if ready == settings.workers:
        notifier.notify("READY=1")
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


def configure_logging() -> None:
    # Operational messages go to stderr; stdout carries only the JSON request lines.
    logging.getLogger("coredis").setLevel(logging.WARNING)  # it logs every retry at INFO
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
