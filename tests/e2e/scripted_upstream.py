"""A scriptable fake upstream for tests/e2e/test_routing_review.py.

POST /_cfg {"script": [...]}: each request pops the next step (the last one repeats). A step:
{"status", "headers", "body" (str), "chunks" ([str]), "delay" (s before headers), "chunk_delay",
"drop" (close with no answer), "hang" (never answer)}. GET /_seen: the requests' bodies."""

import asyncio
import json
import sys

from aiohttp import web

STATE = {"script": [{"status": 200, "body": "{}"}], "seen": []}


async def cfg(request):
    STATE["script"] = (await request.json())["script"]
    STATE["seen"] = []
    return web.json_response({})


async def seen(request):
    return web.json_response(STATE["seen"])


async def handle(request):
    raw = await request.read()
    try:
        STATE["seen"].append({"path": request.path, "headers": dict(request.headers), "body": json.loads(raw)})
    except Exception:
        STATE["seen"].append({"path": request.path, "raw": raw.decode("utf-8", "replace")})
    script = STATE["script"]
    step = script.pop(0) if len(script) > 1 else script[0]
    if step.get("delay"):
        await asyncio.sleep(step["delay"])
    if step.get("hang"):
        await asyncio.sleep(3600)
    if step.get("drop"):
        request.transport.close()
        return web.Response()
    headers = step.get("headers", {})
    if "chunks" in step:
        resp = web.StreamResponse(
            status=step.get("status", 200), headers={"Content-Type": "text/event-stream", **headers}
        )
        await resp.prepare(request)
        for c in step["chunks"]:
            if c == "__DROP__":
                request.transport.close()
                return resp
            await resp.write(c.encode())
            if step.get("chunk_delay"):
                await asyncio.sleep(step["chunk_delay"])
        await resp.write_eof()
        return resp
    return web.Response(
        status=step.get("status", 200),
        body=step.get("body", "{}").encode(),
        headers={"Content-Type": step.get("content_type", "application/json"), **headers},
    )


app = web.Application(client_max_size=64 * 2**20)  # scripts may hold replies of megabytes
app.router.add_post("/_cfg", cfg)
app.router.add_get("/_seen", seen)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
