"""The headers of a request on its way upstream and of its answer on its way back, and the
request ids (thinkcap's own, and a client's ``X-Request-Id``)."""

from __future__ import annotations

import itertools
import os
import re

from multidict import CIMultiDict, CIMultiDictProxy

from thinkcap.proxy.errors import REQUEST_ID
from thinkcap.proxy.transport.server import HttpRequest

#: Request headers that concern one connection only, never forwarded (nor returned).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
#: Response headers not copied back (the body is re-framed; aiohttp's client, used for the
#: pass-through routes, also decompresses it).
NOT_RETURNED = HOP_BY_HOP | {"date", "server"}
NOT_RETURNED_DECODED = NOT_RETURNED | {"content-encoding"}
TYPE_HEADER = "X-Thinkcap-Type"
GOOD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


#: New request ids: a random prefix per process and a counter, 32 hex digits in all (unique
#: without a system call per request, which a fresh UUID costs).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A request id made here."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def client_request_id(request: HttpRequest) -> str | None:
    """The client's ``X-Request-Id``, if it is sane (it is forwarded upstream and logged)."""
    given = request.headers.get(REQUEST_ID)
    return given if given is not None and GOOD_ID.fullmatch(given) else None


#: Request headers never sent upstream (the proxy asks for an unencoded answer itself, and
#: answers ``Expect: 100-continue`` itself).
NOT_FORWARDED = HOP_BY_HOP | {TYPE_HEADER.lower(), "accept-encoding", "expect"}  # Expect is the proxy's own


def upstream_headers(incoming: CIMultiDictProxy[str], api_key: str | None) -> CIMultiDict[str]:
    """End-to-end request headers for the upstream; the backend key replaces the client's."""
    drop = NOT_FORWARDED
    connection = incoming.get("Connection")
    if connection is not None:  # and the headers it names as hop-by-hop
        drop = drop | {h.strip().lower() for h in connection.split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in incoming.items():
        if k.lower() not in drop:
            out.add(k, v)
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def returned_headers(
    upstream: CIMultiDict[str] | CIMultiDictProxy[str], rid: str, *, decoded: bool = False
) -> CIMultiDict[str]:
    """Upstream response headers to send back, plus the request id."""
    drop = NOT_RETURNED_DECODED if decoded else NOT_RETURNED
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)
    out[REQUEST_ID] = rid
    return out
