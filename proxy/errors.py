"""The proxy's own errors, in OpenAI's error format: one builder for every body (answers,
stream error events and the admin API's errors)."""

from __future__ import annotations

from typing import Any

from thinkcap.proxy.transport.server import Reply, json_reply

#: The header that carries thinkcap's request id.
REQUEST_ID = "X-Request-Id"


class ProxyError(Exception):
    """An error answered by the proxy itself, in OpenAI's error format."""

    def __init__(self, status: int, message: str, kind: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        return error_body(self.message, self.kind, code=self.code, param=self.param, request_id=request_id)


def error_body(
    message: str, kind: str, *, code: str | None, param: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"[, "request_id"]}}``."""
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def error_response(exc: ProxyError, rid: str, *, retry_after: int | None = None) -> Reply:
    """The error as an answer, carrying the request id (and ``Retry-After`` when given)."""
    headers = {REQUEST_ID: rid}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return json_reply(exc.body(rid), status=exc.status, headers=headers)
