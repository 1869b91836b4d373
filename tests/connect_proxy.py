"""A forward proxy for the tests: HTTP CONNECT only (how a client reaches an https server
through a proxy), every tunnel going to 127.0.0.1:TARGET_PORT whatever host it names, so an
upstream can have a name nobody resolves. Each CONNECT's request line and Proxy-Authorization
are printed, one JSON line each. A wrong PROXY_AUTH (if set) gets 407.

    python tests/connect_proxy.py PORT TARGET_PORT
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    head = await client_reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    authorization = {name.lower(): value for name, value in headers.items()}.get("proxy-authorization")
    print(json.dumps({"request": lines[0], "proxy_authorization": authorization}), flush=True)
    expected = os.environ.get("PROXY_AUTH")
    if not lines[0].startswith("CONNECT ") or (expected and authorization != expected):
        status = b"407 Proxy Authentication Required" if lines[0].startswith("CONNECT ") else b"405 Method Not Allowed"
        client_writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await client_writer.drain()
        client_writer.close()
        return
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    client_writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await client_writer.drain()
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


async def main() -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    print(json.dumps({"listening": int(sys.argv[1])}), flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
