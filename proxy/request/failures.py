"""One mapping from what can go wrong upstream to the client's OpenAI-style error, for the
shaped routes (thinkcap's own client) and the pass-through (aiohttp's)."""

from __future__ import annotations

import aiohttp

from thinkcap.proxy.errors import ProxyError
from thinkcap.proxy.request.sse import MalformedStreamError
from thinkcap.proxy.transport.client import UpstreamError

#: An :class:`UpstreamError`'s kind, as the error code the client sees.
UPSTREAM_CODES = {"unreachable": "upstream_unreachable", "malformed": "upstream_malformed",
                  "too_large": "upstream_too_large"}  # fmt: skip


def upstream_failure(exc: BaseException, *, mid_stream: bool = False) -> ProxyError:
    """The client's answer to ``exc``: 502 for a refused, dropped, malformed or oversized
    answer, 504 for a timeout (``mid_stream``: once the stream had begun)."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, TimeoutError):
        where = " mid-stream" if mid_stream else ""
        return ProxyError(504, f"the upstream server timed out{where}", "upstream_error", code="upstream_timeout")
    if isinstance(exc, MalformedStreamError):
        return ProxyError(502, str(exc), "upstream_error", code="upstream_malformed")
    if isinstance(exc, UpstreamError):
        if mid_stream:
            return ProxyError(502, "the upstream server dropped the stream", "upstream_error",
                              code="upstream_disconnected")  # fmt: skip
        return ProxyError(502, str(exc), "upstream_error", code=UPSTREAM_CODES.get(exc.kind, "upstream_disconnected"))
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProxyError(
            502, f"cannot connect to the upstream server: {exc.os_error}", "upstream_error", code="upstream_unreachable"
        )
    return ProxyError(
        502, f"the upstream connection failed: {type(exc).__name__}", "upstream_error", code="upstream_disconnected"
    )
