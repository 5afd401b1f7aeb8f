"""structlog configured once: JSON lines when not on a terminal, readable lines otherwise."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, TextIO

import structlog


def finite(value: float) -> float | None:
    """A number for a log line or a JSON record: JSON has no inf or nan, so those are null."""
    return value if math.isfinite(value) else None


def finite_all(obj: Any) -> Any:
    """:func:`finite` through nested dicts and lists."""
    if isinstance(obj, float):
        return finite(obj)
    if isinstance(obj, dict):
        return {k: finite_all(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_all(v) for v in obj]
    return obj


_configured = False
#: Loggers bound once per configuration, by name: binding costs about as much as rendering a
#: line, and every request logs one.
_bound: dict[str, Any] = {}


def configure(*, json_lines: bool | None = None, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Set up structlog (idempotent unless called again with explicit arguments)."""
    global _configured  # noqa: PLW0603 - structlog's configuration is process-wide by design
    if _configured and json_lines is None and stream is None:
        return
    out = stream if stream is not None else sys.stdout
    as_json = json_lines if json_lines is not None else not out.isatty()
    processors: list[Any] = [structlog.processors.add_log_level]
    if as_json:  # machines: a unix timestamp is cheap to write and to read back
        processors += [structlog.processors.TimeStamper(fmt=None, key="ts"), structlog.processors.JSONRenderer()]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(out),  # one write per line (print makes two)
        cache_logger_on_first_use=False,
    )
    _bound.clear()
    _configured = True


def logger(name: str = "thinkcap") -> Any:
    """The project's logger; after :func:`configure`, bound once to that configuration.

    ``structlog.testing.capture_logs`` edits the configured processor list in place, so a
    logger bound before it still reaches the capture. Unconfigured, structlog's default
    writes to whatever ``sys.stdout`` is at each call, so nothing is bound then.
    """
    if not _configured:
        return structlog.get_logger(name)
    bound = _bound.get(name)
    if bound is None:
        bound = _bound[name] = structlog.get_logger(name).bind()
    return bound


def reset() -> None:
    """Back to structlog's defaults (after a run that logged to a file it has closed)."""
    global _configured  # noqa: PLW0603
    structlog.reset_defaults()
    _bound.clear()
    _configured = False
