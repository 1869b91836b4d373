"""Serving: the event loop (uvloop when installed), signals, sd_notify, and WORKERS.

SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the file-backed configuration (reload.py).
With WORKERS=N the parent forks N workers that share the port (SO_REUSEPORT) and forwards
termination and reload signals to them. A start-up failure is one `StartupError` line
from `run`, the same with one process or N: each worker tells the parent, through a pipe of
its own, that it serves or why it could not; the parent stops the others and speaks once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from aiohttp import web

from .app import SERVER_OPTIONS, create_app
from .config import ConfigError, Settings
from .errors import StoreUnavailable
from .keys import LIFECYCLE, LIVE_CONFIG
from .lifecycle import Lifecycle
from .reload import REFUSED, refusal, with_current_routes

log = logging.getLogger("gateway")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# Held back in a new worker until its loop handles them: an early SIGHUP reloads, not kills.
_HELD_SIGNALS = _STOP_SIGNALS | {signal.SIGHUP}
_FORK_HELD_SIGNALS = _HELD_SIGNALS | {signal.SIGCHLD}


class StartupError(Exception):
    """The gateway could not start; the message is the one line to print."""


class ListenError(StartupError):
    """The address could not be bound (in use, not ours, no permission)."""


def run(settings: Settings) -> int:
    # Until the loop handles it, a SIGHUP must not kill; held back (gateway.py's first line does
    # so too), not ignored: one asked for after the files are read, while the store and the
    # listener open, is a reload still to make, delivered once the handler is in (serve).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if settings.workers > 1:
        with _address_lock(settings.listen_host, settings.listen_port):
            _check_address(settings.listen_host, settings.listen_port)
            return _supervise(settings)
    _check_address(settings.listen_host, settings.listen_port)
    return _run_one(settings)


@contextlib.contextmanager
def _address_lock(host: str, port: int) -> Iterator[None]:
    """The address taken by this gateway and its workers while they serve. Two gateways with
    WORKERS started at once each passed `_check_address` before either's workers had bound the
    port, and then all of them bound it with SO_REUSEPORT: both served, sharing connections. An
    abstract unix socket named after the address is bound by one process at a time, in the
    network namespace the port belongs to, and let go by the kernel when its holders exit (the
    workers inherit it). A name held by no gateway of this user's is passed over."""
    if not sys.platform.startswith("linux"):  # abstract unix sockets are Linux's
        yield
        return
    name = f"\0secure-llm-gateway {host}:{port}"
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            lock.bind(name)
            lock.listen()  # so that another start can ask whose it is (`_held_by_us`)
        except OSError as exc:
            # Any local user can bind an abstract name (one under a port they may not bind
            # too): only a gateway of this user's counts, since SO_REUSEPORT shares a port only
            # among one user's sockets; another's hold would keep us from a free port.
            if exc.errno != errno.EADDRINUSE or _held_by_us(name):
                raise _listen_error(host, port, exc) from None
        yield
    finally:
        lock.close()


def _held_by_us(name: str) -> bool:
    """Whether the abstract socket `name` is a gateway's of this user: it listens (a gateway
    does right after it binds; a moment is allowed for that) as this user (SO_PEERCRED)."""
    for _ in range(50):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(name)
            except ConnectionRefusedError:  # bound, not listening (yet)
                time.sleep(0.01)
                continue
            except OSError:
                return True  # cannot tell: refused, as before
            credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            uid: int = struct.unpack("iII", credentials)[1]  # struct ucred: pid, uid, gid
            return uid == os.geteuid()
    return False


def _check_address(host: str, port: int) -> None:
    """Bind the address once, as the listener will (SO_REUSEADDR, v6-only), and let it go.

    Workers bind with SO_REUSEPORT, which lets them share the port with any process of the
    same user that does too: a second gateway started by mistake would quietly take half
    the traffic. Bound without it, this check fails as a single process does, whoever
    holds the port, with the same line either way."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as exc:
        raise _listen_error(host, port, exc) from None


def _listen_error(host: str, port: int, exc: OSError) -> ListenError:
    # os.strerror: the loop's own text quotes the address again; a lookup error has no errno.
    reason = os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else exc.strerror or str(exc)
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ListenError(f"cannot listen on {shown}: {reason}")


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


def _settle_threads() -> None:
    """The event loop gets the GIL back within 1 ms of asking while a worker thread works
    (a structure count, a large reply's translation or redaction), not Python's default 5 ms.
    The loop gives the GIL up at every poll, and each time it waited a full interval to get it
    back: six hostile bodies counted one after another held /healthz 250-520 ms (1 ms: ~50-100).
    The price is paid only while threads overlap: three large replies redacted at once took
    ~5-8% longer (0.5 ms: 11-15%, for a /healthz p99 of 15 ms instead of 25). When no worker
    thread runs, nothing asks and nothing changes."""
    sys.setswitchinterval(0.001)


def _run_one(
    settings: Settings,
    on_ready: Callable[[], None] | None = None,
    on_stopped_early: Callable[[], None] | None = None,
) -> int:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is pinned, but the gateway runs without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        served = runner.run(serve(settings, on_ready))
    # Closing the loop put back the default handlers (SIGTERM kills, SIGINT raises): a stop
    # signal repeated now would turn this clean exit into rc -15 or a traceback. serve() held
    # them back since the stop; ignoring them also drops any that are pending.
    _ignore_stop_signals()
    if not served:
        # A worker tells its parent, which says it once: a worker stopped by its parent because
        # another could not start writes nothing beside that one's error line.
        if on_stopped_early is not None:
            on_stopped_early()
        else:
            log.info("stopped while starting")
    return 0


def _ignore_stop_signals() -> None:
    """The process is on its way out after a stop: a further SIGTERM/SIGINT (an impatient
    operator, a supervisor signalling twice, Ctrl-C reaching the parent and every worker) asks
    for what is already under way, and a SIGHUP (a reload) has nothing left to reload."""
    for signum in _HELD_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> bool:
    """Serve until a stop signal, then drain. False: the stop came while starting, and the
    listener never opened (`on_ready` was not called)."""
    try:
        if settings.workers > 1:  # a worker reads the files as they are now, routes included
            settings = with_current_routes(settings)
        app = create_app(settings)
    except ConfigError as error:  # a file changed since gateway.py checked it
        raise StartupError(error.lines[0]) from None
    lifecycle = app[LIFECYCLE]
    # handler_cancellation: a client that hangs up cancels its handler, and so the upstream call.
    # SERVER_OPTIONS: how create_app's middlewares expect to be served (bodies decoded by them, not
    # by aiohttp). AppRunner passes its **kwargs on untyped, so the mapping's values are too.
    options: dict[str, Any] = dict(SERVER_OPTIONS)
    # keepalive_timeout: a connection idle between requests, or that never finishes sending its
    # request line and headers (aiohttp's timer runs from the connection's start), is closed
    # after CLIENT_IDLE_SECS: slow or silent clients cannot hold sockets for ever.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=2.0,
        keepalive_timeout=settings.client_idle_secs,
        **options,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    # Blocked since gateway.py's first line (or the fork): one that came meanwhile is pending, and
    # a stop asked while starting is a stop. Unblocked, later ones set `stop` through the loop.
    if signal.sigpending() & _STOP_SIGNALS:
        stop.set()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        await runner.setup()
    except StoreUnavailable as exc:  # a Redis Cluster whose layout no node gave (stores/redis.py)
        raise StartupError(f"REDIS_URL: the Redis Cluster's layout could not be read: {exc.message}") from None
    if stop.is_set():  # before the listener opens: nothing is served after the stop
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)  # see the end of this function
        await runner.cleanup()
        return False
    site = web.TCPSite(
        runner,
        settings.listen_host,
        settings.listen_port,
        backlog=2048,
        reuse_port=settings.workers > 1 or None,
    )
    try:
        await site.start()
    except OSError as exc:  # taken since _check_address looked
        await runner.cleanup()
        raise _listen_error(settings.listen_host, settings.listen_port, exc) from None
    loop.add_signal_handler(signal.SIGHUP, app[LIVE_CONFIG].reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # blocked until now: one pending reloads now
    _settle_gc()
    _settle_threads()
    # Port 0 (one process only: config.py refuses it with WORKERS) is the kernel's choice: name it.
    port = settings.listen_port or runner.addresses[0][1]
    log.info("serving on %s:%s (pid %d)", settings.listen_host, port, os.getpid())
    lifecycle.notify("READY=1")
    if on_ready is not None:
        on_ready()
    await stop.wait()
    # Held back from here on in this thread (SIGHUP still reloads while draining): once the
    # loop closes, their default handlers are back until _run_one ignores them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    lifecycle.notify("STOPPING=1")
    log.info("draining (grace %ss)", settings.shutdown_grace_secs)
    # The listener stays open while draining so that /readyz and new requests get a clear
    # 503 (load balancers see it) instead of a refused connection; in-flight requests finish.
    await lifecycle.drain()
    await runner.cleanup()  # closes the listener, then cleanup_ctx
    # Drained: nothing left to reload for. Closing the loop puts SIGHUP's default back (it ends
    # the process, status 129 instead of 0): held back from here, then ignored (_run_one).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    return True


def _supervise(settings: Settings) -> int:
    """Fork the workers; only this parent speaks to systemd (NotifyAccess=main): READY=1
    once every worker serves, STOPPING=1 when it passes a stop signal on."""
    notifier = Lifecycle(0, settings.notify_socket)
    worker_settings = dataclasses.replace(settings, notify_socket=None)
    with _SignalPipe() as signals:
        reports: dict[int, int] = {}  # the read end of each worker's report pipe -> its pid
        for _ in range(settings.workers):
            pid, read_end = _fork_worker(worker_settings, (*reports, *signals.fds))
            reports[read_end] = pid
        workers = _Workers(worker_settings, notifier, list(reports.values()), signals)
        failure = _await_workers(reports, workers)
        status = 0
        if failure is None and not workers.stopping:
            notifier.notify("READY=1")
            status = workers.keep_serving()
        else:  # the workers that did start stop again: it is all of them or none
            workers.pass_on(signal.SIGTERM)
        status = workers.reap_all() or status
    if failure is not None and not workers.stopping:
        if failure:
            raise StartupError(failure)
        return status or 1  # the worker printed its own traceback, as one process would
    return status


class _SignalPipe:
    """The parent's signals, as bytes on a pipe (signal.set_wakeup_fd) that its loop selects on.

    A Python signal handler runs between bytecodes: a signal that lands after the last check
    and before a blocking call (os.wait, select) sets a flag that nothing reads until that call
    returns on its own, so a SIGTERM could wait for ever (CI saw it: no STOPPING=1, no exit). The
    byte is written by the C-level handler at once, and a select that starts after it returns
    at once too."""

    _CAUGHT = (*_HELD_SIGNALS, signal.SIGCHLD)

    def __enter__(self) -> _SignalPipe:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fds = (self._read, self._write)
        self._before = {signum: signal.signal(signum, _noted) for signum in self._CAUGHT}
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        # Blocked since gateway.py's first line: one asked for while starting reaches the pipe now
        # (a reload too: passed on to the workers, which read the files again anyway).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_SIGNALS)
        return self

    def fileno(self) -> int:
        return self._read

    def take(self) -> bytes:
        """The signal numbers that arrived since the last call, oldest first."""
        taken = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._read, 512):
                taken += chunk
        return taken

    def __exit__(self, *_: object) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self._before.items():
            # The parent only exits after this: a stop signal that arrives now (a second
            # SIGTERM) must not kill it with the default handler and make its exit status -15,
            # nor a reload (SIGHUP, left at its default since start-up: held back, not ignored).
            signal.signal(signum, signal.SIG_IGN if signum in _HELD_SIGNALS else handler)
        os.close(self._read)
        os.close(self._write)


def _noted(_signum: int, _frame: object) -> None:
    """Installed so that the C-level handler writes the signal's number on the wakeup pipe; the
    supervisor's loop acts on it there."""


def _forget_parent_signals() -> None:
    """In a new worker: the parent's wakeup pipe and handlers are not its own (its loop installs
    its handlers; until then TERM, INT and HUP stay blocked). SIG_DFL, not SIG_IGN, for SIGHUP:
    ignoring a signal throws away one already pending, and a reload asked for while the worker
    started is to reach its loop."""
    signal.set_wakeup_fd(-1)
    for signum in _HELD_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


class _Workers:
    """The parent's children, and what it does with each signal that reaches it."""

    def __init__(self, settings: Settings, notifier: Lifecycle, pids: list[int], signals: _SignalPipe) -> None:
        self._settings = settings
        self._notifier = notifier
        self.signals = signals
        self.pids = set(pids)
        self.stopping = False

    def take_signals(self) -> None:
        for signum in self.signals.take():
            if signum in _STOP_SIGNALS:
                self.stop(signum)
            elif signum == signal.SIGHUP:  # each worker reloads its own configuration
                if (refused := refusal(self._settings)) is not None:
                    log.error(REFUSED, refused.lines[0])  # once, for every worker (see reload.refusal)
                self.pass_on(signum)
            # SIGCHLD only wakes the loop: the loops reap whatever ended.

    def stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            self._notifier.notify("STOPPING=1")
        self.pass_on(signum)

    def pass_on(self, signum: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def keep_serving(self) -> int:
        """Until a stop signal is passed on: a worker that dies (killed, out of memory, a crash)
        is logged and replaced a second later (a worker that cannot start again does not spin),
        so the port keeps its WORKERS; a replacement that cannot start says why in the log.
        Returns the first non-zero exit status of the workers that ended on the stop."""
        status = 0
        due: list[float] = []  # when each replacement is to be started
        reports: dict[int, int] = {}  # a replacement's report pipe -> its pid, until it reports
        never_served: set[int] = set()  # replacements that reported they could not start
        with selectors.DefaultSelector() as selector:
            selector.register(self.signals, selectors.EVENT_READ)
            try:
                # Not `while self.pids`: when every worker has died at once, none is left until
                # the first replacement is due, and the parent must wait for it, not exit.
                while self.pids or (due and not self.stopping):
                    timeout = None if self.stopping or not due else max(0.0, due[0] - time.monotonic())
                    for key, _ in selector.select(timeout):
                        if key.fileobj is self.signals:
                            self.take_signals()
                        else:
                            selector.unregister(key.fd)
                            pid, message = reports.pop(key.fd), _read_report(key.fd)
                            _log_report(pid, message)
                            if message.startswith("failed"):
                                never_served.add(pid)
                    for pid, code in self._ended():
                        if self.stopping:
                            # A replacement that could not start failed before the stop, and the
                            # log says why: its exit, reaped only now, is not the stop's status.
                            if pid not in never_served:
                                status = status or code
                            continue
                        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                        log.error("worker %d %s; starting another", pid, how)
                        due.append(time.monotonic() + 1)
                    while due and due[0] <= time.monotonic() and not self.stopping:
                        due.pop(0)
                        inherited = (*self.signals.fds, selector.fileno(), *reports)
                        new_pid, report = _fork_worker(self._settings, inherited)
                        selector.register(report, selectors.EVENT_READ)  # the others serve meanwhile
                        reports[report] = new_pid
                        self.pids.add(new_pid)
            finally:
                for report in reports:
                    os.close(report)
        return status

    def _ended(self) -> Iterator[tuple[int, int]]:
        """The workers that have ended since the last look, without blocking."""
        while self.pids:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.pids:
                self.pids.discard(pid)
                yield pid, os.waitstatus_to_exitcode(code)

    def reap_all(self) -> int:
        """Wait for every worker left; the first non-zero exit status."""
        status = 0
        for pid in list(self.pids):
            _, code = os.waitpid(pid, 0)
            self.pids.discard(pid)
            status = status or os.waitstatus_to_exitcode(code)
        return status


def _read_report(report: int) -> str:
    """What a worker wrote on its report pipe ("ready", "stopped" before it served, or "failed"
    and why; "" if it died first), the pipe then closed. One short write per worker: it arrives
    whole (pipe writes up to PIPE_BUF are atomic)."""
    message = ""
    with contextlib.suppress(OSError):
        message = os.read(report, 4096).decode(errors="replace")
    os.close(report)
    return message


def _log_report(pid: int, message: str) -> None:
    """What a replacement worker said of its start. Nothing for "" (it died first: its death
    is logged)."""
    if message == "ready":
        log.info("worker %d serves", pid)
    elif message.startswith("failed"):
        log.error("worker %d could not start: %s", pid, message[len("failed") :].strip() or "see its traceback")


def _fork_worker(settings: Settings, inherited: Iterable[int] = ()) -> tuple[int, int]:
    """A new worker: its pid, and the read end of the pipe on which it reports (ready or
    failed; end of file when it is gone). `inherited`: the parent's descriptors that the
    child closes (the other report pipes, the signal pipe)."""
    _flush_std_streams()  # else the worker inherits, and writes again, what is still buffered
    read_end, write_end = os.pipe()
    # Blocked until the worker's loop handles them, so an early SIGTERM drains, not kills; and
    # none of them reaches the parent's wakeup pipe through the child meanwhile.
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_HELD_SIGNALS)
    pid = os.fork()
    if pid == 0:
        for fd in (read_end, *inherited):
            os.close(fd)
        _forget_parent_signals()
        _work(settings, write_end)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_HELD_SIGNALS)
    # Only the worker holds the write end now: end of file on it means the worker is gone.
    os.close(write_end)
    return pid, read_end


def _await_workers(reports: dict[int, int], workers: _Workers) -> str | None:
    """None once every worker serves, or a stop signal came first; else why one could not
    ("" if it said so itself)."""
    with selectors.DefaultSelector() as selector:  # epoll: no FD_SETSIZE limit on WORKERS
        selector.register(workers.signals, selectors.EVENT_READ)
        for fd in reports:
            selector.register(fd, selectors.EVENT_READ)
        try:
            while len(selector.get_map()) > 1:
                for key, _ in selector.select():
                    if key.fileobj is workers.signals:
                        workers.take_signals()
                        if workers.stopping:
                            return None
                        continue
                    fd = key.fd
                    selector.unregister(fd)
                    message = _read_report(fd)
                    if message == "ready":
                        continue
                    if message == "stopped":  # a stop reached it while it started (systemd
                        workers.take_signals()  # signals every process of the unit): the gateway's
                        log.info("stopped while starting")
                        if not workers.stopping:
                            workers.stop(signal.SIGTERM)
                        return None
                    if message.startswith("failed"):
                        return message[len("failed") :].strip()
                    return f"worker {reports[fd]} exited before serving"
        finally:
            for key in list(selector.get_map().values()):
                if key.fileobj is not workers.signals:
                    os.close(key.fd)
    return None


def _work(settings: Settings, report: int) -> NoReturn:
    """A forked worker: serve, then leave by os._exit (the parent's exit handlers are not ours)."""
    code = 1
    try:
        code = _run_one(
            settings, on_ready=lambda: _tell(report, "ready"), on_stopped_early=lambda: _tell(report, "stopped")
        )
    except StartupError as error:
        _tell(report, f"failed {error}")
    except Exception:
        traceback.print_exc()
        _tell(report, "failed")
    finally:
        _flush_std_streams()  # os._exit flushes nothing
        os._exit(code)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed or a broken pipe: nothing to save
            stream.flush()


def _tell(report: int, message: str) -> None:
    with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
        os.write(report, " ".join(message.split()).encode()[:4000])


class _NoClientBytes(logging.Filter):
    """aiohttp's server logs a request it cannot parse with the offending bytes (a header line
    with a stray control character quotes the whole line, a tenant key included): keep the
    fact, drop the bytes and the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.exc_info:
            record.msg = "a request could not be parsed and was refused (its bytes are not logged)"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _NoDeadlineCuts(logging.Filter):
    """coredis logs a connection attempt that did not complete as "Connection attempt failed
    unexpectedly!", with its traceback, at ERROR. One cut by the store's own deadline (a Redis
    that takes connections and answers nothing: a paused VM, a long fork) is no surprise, and it
    came about once a second for as long as the stall lasted; the store logs the outage itself,
    once (stores/redis.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def configure_logging() -> None:
    # Operational messages go to stderr; stdout carries only the JSON request lines.
    logging.getLogger("coredis").setLevel(logging.WARNING)  # it logs every retry at INFO
    logging.getLogger("coredis").addFilter(_NoDeadlineCuts())
    logging.getLogger("aiohttp.server").addFilter(_NoClientBytes())
    # The SDK's propagator warns on every malformed tracestate, quoting the client's text.
    logging.getLogger("opentelemetry.trace").setLevel(logging.ERROR)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
