"""The TOML reader every thinkcap file goes through: typed, key-tracking reads from one table,
and errors that name the file and the key."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, overload


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""

    def __init__(self, path: str | Path, key: str, why: str) -> None:
        super().__init__(f"{path}: {key}: {why}")
        self.path = str(path)
        self.key = key
        self.why = why


class Table:
    """Typed, key-tracking reads from one TOML table; unread keys are errors at ``close``."""

    def __init__(self, path: str | Path, prefix: str, data: Any, aliases: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.prefix = prefix
        if not isinstance(data, Mapping):
            raise ConfigError(path, prefix, f"must be a table, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.seen: set[str] = set()
        self.aliases = dict(aliases or {})  # keys read here that the file spells elsewhere

    def key(self, name: str) -> str:
        """The dotted path of ``name`` in the file."""
        if name in self.aliases:
            return self.aliases[name]
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, why: str) -> ConfigError:
        """A :class:`ConfigError` for key ``name`` of this table."""
        return ConfigError(self.path, self.key(name), why)

    def _get(self, name: str, default: Any) -> Any:
        self.seen.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                unknown = sorted(set(self.data) - self.seen - {name})
                hint = f" (unknown keys in this table: {', '.join(unknown)})" if unknown else ""
                raise self.error(name, "is required" + hint)
            return default
        return self.data[name]

    def number(
        self,
        name: str,
        default: Any = None,
        *,
        lo: float | None = None,
        lo_open: bool = False,
        hi: float | None = None,
        hi_open: bool = False,
    ) -> float:
        """A finite real number within the given bounds."""
        value = self._get(name, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(name, f"must be finite, got {value!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise self.error(name, f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise self.error(name, f"must be {'<' if hi_open else '<='} {hi:g}, got {value:g}")
        return value

    def integer(self, name: str, default: Any = None, *, lo: int | None = None) -> int:
        """An integer (not a float, not a bool)."""
        value = self._get(name, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {value!r}")
        if lo is not None and value < lo:
            raise self.error(name, f"must be >= {lo}, got {value}")
        return value

    @overload
    def boolean(self, name: str, default: bool) -> bool: ...
    @overload
    def boolean(self, name: str, default: None = None) -> bool | None: ...
    def boolean(self, name: str, default: bool | None = None) -> bool | None:
        """``true`` or ``false``; ``default`` when absent (``None``: tell absent from false)."""
        value = self._get(name, None)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    def string(self, name: str, default: Any = None, *, choices: tuple[str, ...] | None = None) -> str:
        """A string, optionally from a fixed set."""
        value = self._get(name, _REQUIRED if default is None else default)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(name, f"must be one of {list(choices)}, got {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        """A list of strings (default empty)."""
        value = self._get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def positive_numbers(self, name: str) -> tuple[float, ...]:
        """A list of finite numbers > 0 (default empty)."""
        value = self._get(name, [])
        good = isinstance(value, list) and all(
            not isinstance(v, bool) and isinstance(v, int | float) and 0 < v < math.inf for v in value
        )
        if not good:
            raise self.error(name, f"must be a list of finite numbers > 0, got {value!r}")
        return tuple(float(v) for v in value)

    def table(self, name: str) -> Table:
        """A sub-table (an empty one if absent)."""
        return Table(self.path, self.key(name), self._get(name, {}))

    def raw(self, name: str) -> Any:
        """The value as parsed, or ``None``."""
        return self._get(name, None)

    def close(self) -> None:
        """Reject keys nobody read (typos are errors, not silently ignored)."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


class _Required:
    pass


_REQUIRED: Any = _Required()


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning I/O and syntax errors into :class:`ConfigError`."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "no such file") from None
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc)) from None
