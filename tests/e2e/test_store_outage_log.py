"""A quota store that fails is said in the log, once, with why (an operator reading the log
of a gateway whose quotas silently fail open must not have to guess), and its return too; the
Redis password is never in it. Against a real redis-server and the real process."""

from __future__ import annotations

import http.client
import json
import signal
import time

from ..conftest import GatewayFactory
from ..harness import RedisServer, wait_until

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
FAILED = "quota store: Redis call failed"
BACK = "quota store: Redis answers again"


def ask(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", BODY, {"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_wrong_redis_password_is_logged_once_with_why_and_never_the_password(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    assert redis_server.cli("CONFIG", "SET", "requirepass", "the-right-one") == "OK"
    gateway = start_gateway(
        REDIS_URL=f"redis://:wrong-S3CRET%40pass@127.0.0.1:{redis_server.port}/0", QUOTA_FAIL_MODE="open"
    )
    assert [ask(gateway.port) for _ in range(5)] == [200] * 5  # fail open
    wait_until(lambda: FAILED in gateway.process.errors(), what="the store's failure in the log")
    errors = gateway.process.errors()
    failures = [line for line in errors.splitlines() if FAILED in line]
    assert len(failures) == 1, failures  # one line for the outage, not one a request
    assert "WRONGPASS" in failures[0] or "Authentication" in failures[0]
    logged = errors + gateway.process.output()
    assert "S3CRET" not in logged


def test_an_outage_is_logged_when_it_starts_and_when_it_ends(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = start_gateway(REDIS_URL=redis_server.url, QUOTA_FAIL_MODE="open", STORE_TIMEOUT_MS="200")
    assert ask(gateway.port) == 200
    redis_server.kill()

    def failed() -> bool:
        assert ask(gateway.port) == 200  # fail open all along
        return FAILED in gateway.process.errors()

    wait_until(failed, what="the outage in the log")
    redis_server.start()

    def back() -> bool:
        assert ask(gateway.port) == 200
        return BACK in gateway.process.errors()

    wait_until(back, what="the store's return in the log")
    lines = gateway.process.errors().splitlines()
    assert len([line for line in lines if FAILED in line]) == 1
    assert len([line for line in lines if BACK in line]) == 1
    assert BACK not in "".join(lines[: next(i for i, line in enumerate(lines) if FAILED in line)])


def test_a_stalled_redis_is_logged_once_not_a_traceback_a_second(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    # A Redis that takes connections and answers nothing (SIGSTOP: a paused VM, a long fork):
    # each new connection's handshake is cut by the store's deadline, and coredis logged every
    # such cut as "Connection attempt failed unexpectedly!" with a traceback at ERROR, about one
    # a second for as long as the stall lasted, beside the gateway's own single line.
    gateway = start_gateway(REDIS_URL=redis_server.url, QUOTA_FAIL_MODE="open", STORE_TIMEOUT_MS="200")
    assert ask(gateway.port) == 200
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert ask(gateway.port) == 200  # fail open all along
            time.sleep(0.05)
    finally:
        redis_server.process.signal(signal.SIGCONT)
    wait_until(lambda: ask(gateway.port) == 200 and BACK in gateway.process.errors(), what="the store's return")
    errors = gateway.process.errors()
    assert len([line for line in errors.splitlines() if FAILED in line]) == 1
    assert "Traceback" not in errors
    assert " ERROR " not in errors
