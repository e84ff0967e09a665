"""Rules as plain data: what a rule matches on and what it contributes (regions, enclave settings, env, notes)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([KMGTkmgt])?(?:i?B)?$|^([0-9]+)\s*B$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a size such as ``64M``, ``1.5G``, ``512Ki`` (binary units)."""
    if isinstance(value, int):
        return value
    text = value.strip()
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{value!r} is not a size such as 64M or 2G")
    if m.group(3):
        return int(m.group(3))
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def format_size(n: int) -> str:
    """A byte count in the shortest exact binary unit (``64M``, ``1536M``), for reports."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


@dataclass(frozen=True)
class Condition:
    """Facts that must all hold for a rule to match (an empty condition always holds)."""

    executable: tuple[str, ...] = ()
    interpreter: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    paths: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    elf: tuple[tuple[str, Any], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.executable or self.interpreter or self.argv or self.labels or self.paths or self.env
                    or self.elf)


@dataclass(frozen=True)
class RegionRule:
    """A region a rule proposes; ``path`` may use ``${VARIABLE}`` expanded from the analysis."""

    path: str
    mode: str
    reason: str
    only_if_exists: bool = False


@dataclass(frozen=True)
class EnclaveRule:
    """Enclave settings a rule proposes; None leaves a setting to rules of lower precedence."""

    heap: int | None = None
    stack: int | None = None
    threads: int | None = None
    dlopen: str | None = None


@dataclass(frozen=True)
class Rule:
    """One rule file. ``rank`` orders sources (0 shipped, 1.. each ``--rules`` directory in order)."""

    name: str
    description: str = ""
    priority: int = 50
    match_all: Condition = field(default_factory=Condition)
    match_any: tuple[Condition, ...] = ()
    regions: tuple[RegionRule, ...] = ()
    enclave: EnclaveRule = field(default_factory=EnclaveRule)
    env: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    source: str = ""  # the file it was read from
    rank: int = 0

    @property
    def origin(self) -> str:
        return "shipped" if self.rank == 0 else f"--rules #{self.rank}"

    def precedence(self) -> tuple[int, int, str]:
        """Sort key: rules later in this order win conflicts."""
        return (self.rank, self.priority, self.name)


@dataclass(frozen=True)
class RuleSet:
    """The rules in effect, lowest precedence first."""

    rules: tuple[Rule, ...]
    replaced: tuple[tuple[str, str, str], ...] = ()  # (name, replaced source, replacing source)

    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def get(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)
