"""server.py: the address check before serving, workers reporting a failed start-up to the
parent, which speaks once (the e2e start-up tests cover the CLI on any build), and the parent
acting on a signal whenever it lands."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.server import ListenError, _check_address

from .harness import ROOT, RedisServer, base_env, free_port, http_get, wait_until


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_a_free_address_passes_and_stays_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _check_address("127.0.0.1", port)
    with socket.socket() as again:  # the check let go of it
        again.bind(("127.0.0.1", port))


def test_a_port_in_use_is_refused(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(ListenError) as caught:
        _check_address("127.0.0.1", port)
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    with pytest.raises(ListenError, match=f"cannot listen on 0.0.0.0:{port}: Address already in use"):
        _check_address("0.0.0.0", port)  # the wildcard overlaps it too


def test_a_port_shared_with_so_reuseport_is_refused_too() -> None:
    """As a worker of another gateway holds it: with SO_REUSEPORT a new worker could join."""
    with socket.socket() as worker:
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", 0))
        worker.listen()
        port = worker.getsockname()[1]
        with pytest.raises(ListenError, match="Address already in use"):
            _check_address("127.0.0.1", port)


def test_an_address_that_is_not_ours_is_refused() -> None:
    with pytest.raises(ListenError, match=r"cannot listen on 192\.0\.2\.1:\d+: Cannot assign requested address"):
        _check_address("192.0.2.1", 8080)  # TEST-NET-1: on no interface of this machine


def test_ipv6_is_shown_in_brackets() -> None:
    try:
        v6 = socket.socket(socket.AF_INET6)
        v6.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with v6:
        v6.listen()
        port = v6.getsockname()[1]
        with pytest.raises(ListenError, match=rf"cannot listen on \[::1\]:{port}: Address already in use"):
            _check_address("::1", port)


# The source entry point with the address check turned off, so that the workers themselves
# meet the port in use: what a port taken between the check and the bind looks like.
UNCHECKED = (
    "import runpy, sys; import gateway.server as server; "
    "server._check_address = lambda host, port: None; "
    f"sys.argv = ['gateway']; runpy.run_path({str(ROOT / 'gateway.py')!r}, run_name='__main__')"
)


@pytest.mark.parametrize("workers", ["1", "2", "3"])
def test_workers_that_cannot_listen_are_one_line_from_the_parent(
    listener: socket.socket, redis_server: RedisServer, workers: str
) -> None:
    port = listener.getsockname()[1]
    env = base_env() | {"LISTEN_ADDR": f"127.0.0.1:{port}", "WORKERS": workers, "REDIS_URL": redis_server.url}
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(
            [sys.executable, "-c", UNCHECKED], env=env, cwd=cwd, capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.fixture(scope="module")
def late_block(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build tests/late_block.c")
    library = tmp_path_factory.mktemp("shim") / "late_block.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(ROOT / "tests" / "late_block.c"), "-ldl"], check=True
    )
    return library


@dataclasses.dataclass
class Parent:
    """A gateway started from source with WORKERS=2, in a session of its own."""

    process: subprocess.Popen[bytes]
    notify: socket.socket  # what it tells systemd (NOTIFY_SOCKET), 15 s to say each thing
    port: int
    errors: Path  # its stderr

    def said(self) -> bytes:
        return self.notify.recv(100)


@contextlib.contextmanager
def two_workers(tmp_path: Path, redis_server: RedisServer, **env: str) -> Iterator[Parent]:
    port, path, errors = free_port(), tmp_path / "notify.sock", tmp_path / "gateway.err"
    env = (
        base_env()
        | {
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "WORKERS": "2",
            "REDIS_URL": redis_server.url,
            "NOTIFY_SOCKET": str(path),
        }
        | env
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, errors.open("wb") as stderr:
        notify.bind(str(path))
        notify.settimeout(15)
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "gateway.py")],
            env=env,
            cwd=tmp_path,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            yield Parent(process, notify, port, errors)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # a parent that hung leaves no worker behind
            process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_just_before_the_parent_blocks_still_stops_every_worker(
    late_block: Path, redis_server: RedisServer, tmp_path: Path, signum: signal.Signals
) -> None:
    # The signal lands after the parent last looked at its signal flags, before it blocks waiting
    # for its workers (tests/late_block.c widens that moment). A handler run between bytecodes
    # would not run until a worker ended, and none would: no STOPPING=1 and no exit, for ever.
    with two_workers(tmp_path, redis_server, LD_PRELOAD=str(late_block)) as gateway:
        assert gateway.said() == b"READY=1"
        gateway.process.send_signal(signum)  # at once: the parent is in the widened moment
        assert gateway.said() == b"STOPPING=1"
        assert gateway.process.wait(10) == 0


def _workers_of(parent: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    return []


def _epoll_fds(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        # A descriptor the worker closes while it is listed (a connection, a pipe) is gone by
        # the time it is read: not an epoll one (a CI run failed on FileNotFoundError here).
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(fd) == "anon_inode:[eventpoll]"
    return count


def test_workers_that_all_die_at_once_are_all_replaced(redis_server: RedisServer, tmp_path: Path) -> None:
    # None is left until the first replacement is due, a second later: the parent waits for it,
    # rather than taking "no worker left" for the end of a stop and exiting 0 with nobody serving.
    with two_workers(tmp_path, redis_server) as gateway:
        assert gateway.said() == b"READY=1"  # both serve: a worker killed before that is a failed start
        parent = gateway.process.pid
        first = _workers_of(parent)
        epolls = _epoll_fds(first[0])
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        replaced = wait_until(
            lambda: (now := _workers_of(parent)) and len(now) == 2 and not set(now) & set(first) and now,
            what="2 new workers",
        )
        wait_until(lambda: _answers(gateway.port), what="the new workers serving")
        assert gateway.process.poll() is None
        # A replacement holds what a first worker holds: not the parent's selector too.
        assert [_epoll_fds(pid) for pid in replaced] == [epolls, epolls]
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(10) == 0


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError):
        return http_get(port, "/healthz")[0] == 200
    return False


def test_a_reload_asked_for_while_the_workers_start_reaches_every_worker(
    late_block: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Each new worker pauses right after fork (tests/late_block.c), before it sets up its
    # signals; the SIGHUP passed on meanwhile waits, blocked, for the worker's loop. Setting the
    # signal to "ignore" in that moment would throw it away.
    with two_workers(tmp_path, redis_server, LD_PRELOAD=str(late_block), LATE_BLOCK="after-fork") as gateway:
        wait_until(lambda: len(_workers_of(gateway.process.pid)) == 2, what="both workers forked")
        gateway.process.send_signal(signal.SIGHUP)  # the workers are still in their pause
        assert gateway.said() == b"READY=1"
        logged = gateway.errors
        wait_until(lambda: logged.read_text().count("configuration reloaded") == 2, what="a reload in each worker")
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(10) == 0


def test_a_replacement_that_cannot_start_says_why(redis_server: RedisServer, tmp_path: Path) -> None:
    # A replacement worker reads the configuration files again; one deleted since start-up
    # stops it. The parent logs why it could not start, not only "exited with status 1".
    keys = tmp_path / "keys.env"
    keys.write_text("team=sk-team-0123456789\n")
    with two_workers(tmp_path, redis_server, TENANT_KEYS_FILE=str(keys)) as gateway:
        assert gateway.said() == b"READY=1"
        keys.unlink()
        os.kill(_workers_of(gateway.process.pid)[0], signal.SIGKILL)
        logged = gateway.errors
        line = wait_until(
            lambda: next((x for x in logged.read_text().splitlines() if "could not start:" in x), None),
            what="the replacement's reason",
        )
        assert "TENANT_KEYS_FILE" in line and str(keys) in line
        assert "sk-team" not in logged.read_text()
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(10) == 0


# The gateway with one change: the moment right after the app is built (the files are read) and
# before SIGHUP's handler is installed, widened: it adds a tenant to TENANT_KEYS_FILE there, as an
# operator may, and asks for a reload (the SIGHUP `systemctl reload` or a deploy tool sends).
_RELOAD_WHILE_STARTING = """
import os, runpy, signal, sys
import gateway.server as server

built = server.create_app

def create_app(settings):
    app = built(settings)
    with open(os.environ["TENANT_KEYS_FILE"], "a") as keys:
        keys.write("late=sk-late-0123456789\\n")
    os.kill(os.getpid(), signal.SIGHUP)
    return app

server.create_app = create_app
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_reload_asked_for_after_the_files_are_read_is_not_lost(tmp_path: Path) -> None:
    # One process ignored SIGHUP until its loop's handler was installed: a reload asked for after
    # the files were read for the app (while the store and the listener were opened) was thrown
    # away, and the gateway served the files as they had been, saying nothing (found by a review).
    keys = tmp_path / "keys.env"
    keys.write_text("team=sk-team-0123456789\n")
    port, errors = free_port(), tmp_path / "gateway.err"
    env = base_env() | {"LISTEN_ADDR": f"127.0.0.1:{port}", "RPS": "0", "TENANT_KEYS_FILE": str(keys)}
    env["OPENAI_BASE_URL"] = "http://127.0.0.1:1"  # the model lookup fails fast (502), past the key check
    argv = [sys.executable, "-c", _RELOAD_WHILE_STARTING, str(ROOT / "gateway.py")]
    with errors.open("wb") as stderr, subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=stderr) as process:
        try:
            wait_until(lambda: "configuration reloaded" in errors.read_text(), what="the reload")
            assert http_get(port, "/healthz")[0] == 200
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models/x", headers={"X-Api-Key": "sk-late-0123456789"})
            assert conn.getresponse().status != 401  # the tenant the reload added
            conn.close()
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
