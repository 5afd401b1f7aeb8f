"""The chunked transfer coding, taken apart as its bytes arrive: request bodies on the data
plane's server and answers on the upstream client go through the same strict reader."""

from __future__ import annotations

HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
#: A chunk size line, or the trailer section, longer than this is malformed.
MAX_LINE_BYTES = 64 * 1024


class ChunkError(ValueError):
    """The chunked framing is malformed."""


class BodyLimitError(Exception):
    """The next chunk would take the body past its limit."""


def take_chunks(buf: bytearray, body: bytearray, limit: int | None = None, *, one: bool = False) -> bool:
    """Move the whole chunks at the start of ``buf`` into ``body`` (with ``one``, at most one
    chunk that carries data, and the last chunk if it follows at once).

    Returns True once the last chunk and its trailers are consumed (any bytes after them stay
    in ``buf``), False while more must arrive. Chunk sizes must be plain hex digits (``int()``
    alone would also take signs, underscores and ``0x``) and every chunk must end in CRLF.
    Raises :class:`BodyLimitError`, with the chunk left in ``buf``, when ``body`` would grow
    past ``limit``.
    """
    while True:
        eol = buf.find(b"\r\n")
        if eol < 0:
            if len(buf) > MAX_LINE_BYTES:
                raise ChunkError("a chunk size line is too long")
            return False
        digits = bytes(buf[:eol]).split(b";", 1)[0].strip()
        if not 0 < len(digits) <= 16 or not HEX_DIGITS.issuperset(digits):
            raise ChunkError("bad chunk size line")
        size = int(digits, 16)
        if size == 0:  # the last chunk; then trailer lines, ended by an empty line
            end = buf.find(b"\r\n\r\n", eol)
            if end < 0:
                if len(buf) > MAX_LINE_BYTES:
                    raise ChunkError("the trailer section is too long")
                return False
            del buf[: end + 4]
            return True
        if one and body:
            return False
        if len(buf) < eol + 4 + size:
            return False
        if buf[eol + 2 + size : eol + 4 + size] != b"\r\n":
            raise ChunkError("a chunk is not followed by CRLF")
        if limit is not None and len(body) + size > limit:
            raise BodyLimitError
        body += buf[eol + 2 : eol + 2 + size]
        del buf[: eol + 4 + size]
