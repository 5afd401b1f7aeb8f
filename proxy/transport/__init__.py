"""HTTP/1.1 on the data plane's wire, with no OpenAI semantics: the server and the upstream client."""

from thinkcap.proxy.transport.client import Response, Upstream, UpstreamError
from thinkcap.proxy.transport.server import BodyTooLargeError, HttpRequest, HttpServer, Reply, StreamReply, json_reply

__all__ = [
    "BodyTooLargeError",
    "HttpRequest",
    "HttpServer",
    "Reply",
    "Response",
    "StreamReply",
    "Upstream",
    "UpstreamError",
    "json_reply",
]
