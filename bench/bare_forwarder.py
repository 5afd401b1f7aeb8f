"""A bare forwarder: the least a Python proxy on asyncio does, as a reference for ``bench/proxy.py``.

Run: python -P bench/bare_forwarder.py PORT UPSTREAM_PORT (``-P``: ``bench/proxy.py`` would
otherwise shadow the ``proxy`` package).

It reads each request (``Content-Length`` bodies only), sends it on with thinkcap's own
upstream client, and relays the answer: whole, or chunk by chunk when the upstream streams.
No classification, caps, admission, accounting, metrics or logs, and no error handling
beyond closing the connection. Whatever it adds over the direct path is the share of the
added latency that any Python forwarder pays on the machine at hand (event loop, sockets,
the extra hop between CPUs); what thinkcap adds beyond it is thinkcap's own.
"""

from __future__ import annotations

import asyncio
import sys

from multidict import CIMultiDict

from proxy.runtime import run
from proxy.upstream import Upstream


class BareForwarder(asyncio.Protocol):
    """One client connection (the benchmark sends a request only after the previous answer)."""

    def __init__(self, upstream: Upstream, tasks: set[asyncio.Task[None]]) -> None:
        self.upstream = upstream
        self.tasks = tasks
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            task = asyncio.ensure_future(self.forward(head[0].split(" ")[1], body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    async def forward(self, path: str, body: bytes) -> None:
        headers = CIMultiDict({"Content-Type": "application/json"})
        async with await self.upstream.request("POST", path, headers, body) as up:
            out = self.transport
            if out is None:
                return
            head = f"HTTP/1.1 {up.status} OK\r\nContent-Type: {up.headers.get('Content-Type', 'application/json')}"
            if "chunked" in up.headers.get("Transfer-Encoding", ""):
                out.write(f"{head}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
                async for chunk in up.iter_chunks():
                    out.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                out.write(b"0\r\n\r\n")
            else:
                data = await up.read()
                out.write(f"{head}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)


async def main(port: int, upstream_port: int) -> None:
    upstream = Upstream(f"http://127.0.0.1:{upstream_port}")
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: BareForwarder(upstream, tasks), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    run(main(int(sys.argv[1]), int(sys.argv[2])))
