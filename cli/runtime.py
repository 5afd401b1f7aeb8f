"""Run a coroutine on uvloop when it is installed (the ``fast`` extra), else on plain asyncio."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("auto", "asyncio", "uvloop")


def listen_flag(text: str) -> tuple[str, int]:
    """A ``--listen "host:port"`` flag's host and port (a usage error names the flag)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f'--listen: must be "host:port", got {text!r}')
    return host, int(port)


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """``asyncio.run`` on the chosen event loop; ``auto`` takes uvloop if it can be imported."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {list(LOOPS)}, got {loop!r}")
    if loop != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if loop == "uvloop":
                main.close()
                raise ValueError("--loop uvloop: uvloop is not installed (pip install 'thinkcap[fast]')") from None
        else:
            result: T = uvloop.run(main)
            return result
    return asyncio.run(main)


#: Descriptors kept free for the upstream pool, logs and the admin listener.
RESERVED_FILES = 256


def raise_open_files() -> int | None:
    """Raise this process's soft open-files limit to its hard limit (idle client connections
    each hold one); returns the soft limit now in force, ``None`` where there is none to read."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft
