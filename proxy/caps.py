"""The cap table: one immutable mapping from type to cap, swapped atomically, plus pins."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class CapTable:
    """Caps by type name, with where they came from and a version that grows with each publish."""

    caps: Mapping[str, int]
    source: str
    version: int = 0
    decision_id: str | None = None
    time: float = 0.0

    def __post_init__(self) -> None:
        for name, cap in self.caps.items():
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                raise ValueError(f"cap for {name!r} must be an integer >= 0, got {cap!r}")
        object.__setattr__(self, "caps", MappingProxyType(dict(self.caps)))


@dataclass
class CapStore:
    """The current table and the pinned caps (admin pins win until unpinned).

    Readers call :meth:`cap`; writers replace the whole table with :meth:`publish`, so a
    request never sees half of an update.
    """

    table: CapTable
    pins: Mapping[str, int] = field(default_factory=dict)

    def cap(self, name: str) -> int:
        """The cap in force for ``name``."""
        pinned = self.pins.get(name)
        return self.table.caps[name] if pinned is None else pinned

    def effective(self) -> dict[str, int]:
        """Every type's cap in force."""
        return {n: self.cap(n) for n in self.table.caps}

    def publish(
        self, caps: Mapping[str, int], source: str, *, decision_id: str | None = None, now: float = 0.0
    ) -> CapTable:
        """Replace the table; the new version is one more than the old."""
        unknown = set(caps) ^ set(self.table.caps)
        if unknown:
            raise ValueError(f"a new cap table must name exactly the configured types; differs on {sorted(unknown)}")
        self.table = CapTable(caps, source, self.table.version + 1, decision_id, now)
        return self.table

    def pin(self, caps: Mapping[str, int]) -> None:
        """Pin some types' caps (validated like a table)."""
        unknown = sorted(set(caps) - set(self.table.caps))
        if unknown:
            raise ValueError(f"unknown types {unknown}; configured: {sorted(self.table.caps)}")
        CapTable(caps, "pin")
        self.pins = MappingProxyType({**self.pins, **caps})

    def unpin(self, names: list[str] | None = None) -> None:
        """Unpin the named types, or all."""
        self.pins = MappingProxyType({} if names is None else {k: v for k, v in self.pins.items() if k not in names})
