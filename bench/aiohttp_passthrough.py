"""A plain aiohttp pass-through: the reference the proxy benchmark holds thinkcap against.

Run: python -P bench/aiohttp_passthrough.py PORT UPSTREAM_PORT (``-P``: ``bench/proxy.py``
would otherwise shadow the ``proxy`` package).

aiohttp's server reads each request, aiohttp's client sends it on (one pooled session), and
the answer is relayed: whole, or piece by piece as it arrives when the upstream streams. No
classification, caps, admission, accounting, metrics or logs. It runs on uvloop when
installed, as ``thinkcap serve`` does. Whatever it adds over the direct path is what the
usual way of writing a Python gateway costs on the machine at hand.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

from thinkcap.cli.runtime import run


async def main(port: int, upstream_port: int) -> None:
    base = f"http://127.0.0.1:{upstream_port}"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1024), timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
    )

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.post(base + request.path_qs, data=body, headers=headers) as up:
            content_type = up.headers.get("Content-Type", "application/json")
            if content_type.startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": content_type})
                await resp.prepare(request)
                async for piece in up.content.iter_any():
                    await resp.write(piece)
                await resp.write_eof()
                return resp
            return web.Response(body=await up.read(), status=up.status, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    run(main(int(sys.argv[1]), int(sys.argv[2])))
