"""A small TOML writer for thinkcap configs (tables, arrays of tables, inline tables, scalars)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write a non-finite number to TOML: {value!r}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_scalar(v)}" for k, v in value.items()) + " }"
    raise ValueError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def dumps(data: Mapping[str, Any]) -> str:
    """Serialise a config: top-level tables as ``[name]``, lists of tables as ``[[name]]``;
    tables nested deeper are written inline."""
    lines: list[str] = []
    for key, value in data.items():
        if not isinstance(value, Mapping | list) or (
            isinstance(value, list) and not all(isinstance(v, Mapping) for v in value)
        ):
            lines.append(f"{_key(key)} = {_scalar(value)}")
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{_key(key)}]"] + [f"{_key(k)} = {_scalar(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                lines += ["", f"[[{_key(key)}]]"] + [f"{_key(k)} = {_scalar(v)}" for k, v in item.items()]
    return "\n".join(lines).lstrip("\n") + "\n"
