"""Real processes for the tests: the gateway, the mock upstream, redis-server (and a cluster).

Everything binds free loopback ports and is stopped at teardown; the system Redis, if
any, is never touched. GATEWAY_CMD runs the suite against another build of the gateway
(e.g. GATEWAY_CMD=dist/gateway for the frozen binary).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free and valid too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _answers(port: int, path: str) -> bool:
    try:
        return http_get(port, path)[0] < 500
    except OSError:
        return False


def _accepts(port: int, path: str) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Process:
    """A child process with its output in a file (so a chatty child never blocks on a pipe)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.err_path = log_path.with_suffix(".err")
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        # A session of its own: what it forks (WORKERS, or the frozen binary's real process under
        # PyInstaller's bootloader, which cannot pass SIGKILL on) is killed with it, as systemd
        # kills a unit's whole control group, and none outlives the test.
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=self._err, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.err_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:  # a crash: every process of it
            self._kill_group()
        elif self.proc.poll() is None:
            self.proc.send_signal(signum)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_group()  # whatever it left behind
        self._log.close()
        self._err.close()


# A machine's egress proxy is not the tests': the tests that use one set it.
_PROXY_NAMES = frozenset({"https_proxy", "http_proxy", "no_proxy", "all_proxy"})


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "OPENAI_", "REDIS_", "TENANT_", "POLICY_")) and k.lower() not in _PROXY_NAMES
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


class Mock:
    def __init__(self, tmp: Path, **env: str) -> None:
        self.port = free_port()
        full_env = base_env() | {"PORT": str(self.port), "CHUNK_DELAY_MS": "0"} | env
        self.process = Process(
            [sys.executable, str(ROOT / "mock" / "server.py")], full_env, tmp, tmp / f"mock-{self.port}.log"
        )
        # Over https (TLS_CERT, TLS_KEY), it is ready when its port takes connections: the
        # control calls below speak plain HTTP.
        self.scheme = "https" if env.get("TLS_CERT") else "http"
        ready = _accepts if self.scheme == "https" else _answers
        wait_until(lambda: ready(self.port, "/_mock/events"), what="the mock upstream")

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        return list(json.loads(http_get(self.port, "/_mock/requests")[1]))

    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(http_get(self.port, "/_mock/events")[1]))

    def forget(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        conn.request("DELETE", "/_mock/requests")
        conn.getresponse().read()
        conn.close()

    def fault(self, **fault: object) -> None:
        """Fail this instance (mock/server.py's POST /_mock/fault: status, retry_after,
        latency_ms, drop, die_after, count), whatever the requests' headers say."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        conn.request("POST", "/_mock/fault", json.dumps(fault), {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()

    def heal(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        conn.request("DELETE", "/_mock/fault")
        conn.getresponse().read()
        conn.close()

    def stop(self) -> None:
        self.process.stop()


def gateway_argv() -> list[str]:
    custom = os.environ.get("GATEWAY_CMD")
    if custom:
        argv = shlex.split(custom)
        argv[0] = (
            str((ROOT / argv[0]).resolve()) if not os.path.isabs(argv[0]) and (ROOT / argv[0]).exists() else argv[0]
        )
        return argv
    return [sys.executable, str(ROOT / "gateway.py")]


class Gateway:
    def __init__(
        self, tmp: Path, env: dict[str, str], wait: bool = True, wrap: list[str] | None = None, dotenv: str = ""
    ) -> None:
        """`wrap`: a command that runs the gateway's (as `unshare ...`), its argv appended;
        `dotenv`: the `.env` in its working directory."""
        self.port = free_port()
        self.env = (
            base_env()
            | {
                "LISTEN_ADDR": f"127.0.0.1:{self.port}",
                "RPS": "0",
                "DEFAULT_QUOTA": "100000",
            }
            | env
        )
        # An empty working directory: no stray .env is picked up.
        self.cwd = tmp / f"gw-{self.port}"
        self.cwd.mkdir()
        if dotenv:
            (self.cwd / ".env").write_text(dotenv)
        self.process = Process([*(wrap or []), *gateway_argv()], self.env, self.cwd, tmp / f"gateway-{self.port}.log")
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        workers = int(self.env.get("WORKERS", "1"))

        def ready() -> bool:
            if self.process.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.process.errors()}")
            # Every worker serving, not just the first to bind: the others would get no
            # connections until they do.
            return self.process.errors().count("serving on") >= workers and _answers(self.port, "/healthz")

        wait_until(ready, timeout=timeout, what="the gateway")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.process.output().splitlines() if line.startswith("{")]

    def metrics(self) -> str:
        return http_get(self.port, "/metrics")[1].decode()

    def stop(self) -> None:
        self.process.stop()


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not installed: apt-get install redis-server (the tests start their own)")
    return path


class RedisServer:
    """A throw-away redis-server on a free port; kill() and start() again on the same port."""

    def __init__(self, tmp: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.binary = require_redis_server()
        self.port = port or free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir(exist_ok=True)
        self.extra = extra or []
        self.process: Process | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            *self.extra,
        ]
        self.process = Process(argv, base_env(), self.dir, self.dir / "redis.log")
        wait_until(lambda: self.cli("PING") == "PONG", what=f"redis-server on {self.port}")

    def cli(self, *args: str) -> str:
        try:
            out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def kill(self) -> None:
        assert self.process is not None
        self.process.proc.kill()
        self.process.proc.wait()
        self.process.stop()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class RedisCluster:
    """Three masters (nodes[:3]), no replicas unless asked, created with redis-cli --cluster create.

    full_coverage=False: the masters keep serving their own slots while another is down
    (`cluster-require-full-coverage no`); with Redis' default they refuse every key then.
    replicas=1: a replica per master (nodes[3:]), in sync before this returns."""

    def __init__(self, tmp: Path, full_coverage: bool = True, replicas: int = 0) -> None:
        self.nodes = [
            RedisServer(
                tmp,
                port=free_cluster_port(),
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    *([] if full_coverage else ["--cluster-require-full-coverage", "no"]),
                ],
            )
            for _ in range(3 * (1 + replicas))
        ]
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_until(lambda: "cluster_state:ok" in self.nodes[0].cli("CLUSTER", "INFO"), timeout=20, what="cluster ok")
        if replicas:
            wait_until(self.in_sync, timeout=30, what="the replicas in sync")

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def get(self, key: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-c", "-p", str(self.nodes[0].port), "GET", key], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip()

    def node_of(self, key: str) -> RedisServer:
        """The master serving `key`'s slot (as the cluster's own map has it)."""
        slot = int(self.nodes[0].cli("CLUSTER", "KEYSLOT", key))
        for node in self.nodes:
            myself = next(line for line in node.cli("CLUSTER", "NODES").splitlines() if "myself" in line)
            for assigned in myself.split()[8:]:
                low, _, high = assigned.partition("-")
                if not low.startswith("[") and int(low) <= slot <= int(high or low):
                    return node
        raise AssertionError(f"no master serves slot {slot}")

    def ok(self) -> bool:
        """Every node up and agreeing that the cluster is ok."""
        return all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in self.nodes)

    def in_sync(self) -> bool:
        """Every replica connected to its master and holding all it was sent."""
        for node in self.nodes:
            info = dict(line.split(":", 1) for line in node.cli("INFO", "replication").split() if ":" in line)
            if info.get("role") == "master" and int(info.get("connected_slaves", 0)):
                replica = dict(pair.split("=") for pair in info["slave0"].split(","))
                if replica["state"] != "online" or replica["offset"] != info["master_repl_offset"]:
                    return False
            elif info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
