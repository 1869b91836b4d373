"""A client that leaves while the gateway waits on its full socket (sweep-f)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from gateway.proxy import _write_while_taken


def test_a_write_failed_by_the_client_leaving_logs_nothing() -> None:
    # The client's connection is lost: aiohttp fails the pending write (ConnectionError) and
    # cancels the handler in the same turn of the loop. The write's exception must be retrieved,
    # or asyncio logs "Task exception was never retrieved" with a traceback at ERROR for a
    # client that merely hung up.
    reported: list[dict[str, Any]] = []

    gc.collect()  # earlier tests' garbage, before this loop's handler listens

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(context))
        lost: asyncio.Future[None] = loop.create_future()

        async def writing() -> None:
            await lost

        waiting = asyncio.ensure_future(_write_while_taken(writing(), None, 10, 5.0))
        await asyncio.sleep(0.01)  # the write and the wait for it have begun
        lost.set_exception(ConnectionError("Connection lost"))
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    gc.collect()
    # Only the write's own exception counts: a collection here may also find other tests' garbage
    # (an SDK client's task of an earlier loop, reported to whichever loop is running).
    ours = [c for c in reported if isinstance(c.get("exception"), ConnectionError)]
    assert not [c for c in ours if "never retrieved" in str(c.get("message"))], ours
