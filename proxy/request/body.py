"""The shaped request's body on its way upstream: the client's own bytes, where they can be kept.

The proxy parses the body to classify it and writes a cap (and, for streams, a usage request)
into the parsed object. Encoding that object again costs time in proportion to the prompt,
and turns every non-ASCII character into a ``\\uXXXX`` escape. When the edits only added
top-level keys, which is the usual case, those keys are written into the client's bytes just
before the closing brace instead, and the rest goes upstream exactly as the client sent it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_MISSING = object()
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode


def _utf8(raw: bytes) -> bool:
    """Whether ``json.loads`` read ``raw`` as UTF-8 (without a byte order mark)."""
    if raw[:1] == b"{" and raw[1:2] != b"\x00":  # UTF-16 and UTF-32 put a zero byte next to "{"
        return True
    return json.detect_encoding(raw) == "utf-8"


def upstream_body(raw: bytes, before: Mapping[str, Any], body: Mapping[str, Any]) -> bytes:
    """``body``, the client's object after the proxy's edits, as bytes for the upstream.

    ``raw`` is what the client sent and ``before`` a shallow copy of the object parsed from it,
    taken before any edit. An edit must replace a top-level value, never change one in place:
    a value that is still the same object counts as unchanged. If any value of ``before``
    changed or went away, or ``raw`` is not UTF-8, the object is encoded again.
    """
    for key, value in before.items():
        if body.get(key, _MISSING) is not value:
            return json.dumps(body).encode()
    if len(body) == len(before):
        return raw
    end = len(raw) - 1 if raw[-1:] == b"}" else len(raw.rstrip()) - 1  # JSON allows only whitespace after it
    if end < 0 or raw[end] != 0x7D or not _utf8(raw):  # 0x7D is "}"
        return json.dumps(body).encode()
    fields = _COMPACT({key: value for key, value in body.items() if key not in before}).encode()[1:-1]
    return raw[:end] + (b"," if before else b"") + fields + raw[end:]
