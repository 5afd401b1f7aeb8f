"""Run a coroutine on uvloop when it is installed (the ``fast`` extra), else on plain asyncio."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("auto", "asyncio", "uvloop")


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
