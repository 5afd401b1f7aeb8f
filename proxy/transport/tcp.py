"""What both ends of the data plane do to a fresh TCP connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (no Nagle delay): an answer's head and first event are small."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
