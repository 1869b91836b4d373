"""A local OTLP/HTTP receiver for the tracing benchmark: accepts and drops span batches."""

import os

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=200)


app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/v1/traces", accept)
web.run_app(app, host="127.0.0.1", port=int(os.environ.get("PORT", "4318")), print=None, access_log=None)
