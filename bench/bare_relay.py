"""The ceiling of our stack: a bare aiohttp pass-through relay (no features), for comparison."""

import asyncio
import os

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = os.environ["UPSTREAM"]
PORT = int(os.environ.get("PORT", "8090"))
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    async with request.app[SESSION].post(UPSTREAM + request.path, data=body, headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": upstream.content_type})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def main() -> None:
    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    app.router.add_post("/v1/messages", relay)  # the same relay for Anthropic's route
    app.router.add_post("/v1/responses", relay)  # and for the Responses API and embeddings
    app.router.add_post("/v1/embeddings", relay)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(app))


async def serve(app: web.Application) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT, backlog=2048).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
