"""Every ``/v1/`` route but the shaped ones, passed through unchanged (aiohttp's client)."""

from __future__ import annotations

import aiohttp

from thinkcap.proxy.errors import ProxyError, error_response
from thinkcap.proxy.request.failures import upstream_failure
from thinkcap.proxy.request.headers import new_request_id, returned_headers, upstream_headers
from thinkcap.proxy.request.parse import read_body
from thinkcap.proxy.state import ProxyState
from thinkcap.proxy.transport.server import HttpRequest, Reply, StreamReply


def client_timeout(state: ProxyState) -> aiohttp.ClientTimeout:
    """No total limit unless configured; a read timeout between chunks."""
    b = state.settings.backend
    return aiohttp.ClientTimeout(total=b.total_timeout_s, connect=b.connect_timeout_s, sock_read=b.read_timeout_s)


async def passthrough(st: ProxyState, request: HttpRequest) -> Reply | StreamReply:
    """Any other ``/v1/`` route: method, path, query, body and end-to-end headers, as they are.

    A failure before the upstream answers is an OpenAI-style error; one after the answer
    started cuts the connection, so that the client sees an incomplete body, not a short one.
    """
    rid = new_request_id()
    resp: StreamReply | None = None
    try:
        raw = await read_body(request, st.settings.proxy.max_body_bytes)
        url = st.pool.route().url + request.path_qs
        headers = upstream_headers(request.headers, st.settings.backend.api_key)
        async with st.http().request(
            request.method, url, data=raw or None, headers=headers, timeout=client_timeout(st)
        ) as up:
            resp = StreamReply(status=up.status, headers=returned_headers(up.headers, rid, decoded=True))
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp
    except (ProxyError, aiohttp.ClientError, TimeoutError) as exc:
        if resp is not None and resp.prepared:
            request.abort()
            return resp
        return error_response(upstream_failure(exc), rid)
