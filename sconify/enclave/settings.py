"""Enclave settings (heap, stack, threads, dlopen mode, debug) and SCONE's size notation such as ``64M``."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from sconify.errors import UsageError

PAGE_SIZE = 4096

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

DEFAULT_HEAP = 64 * MIB
DEFAULT_STACK = 1 * MIB
DEFAULT_THREADS = 8

# Limits keep a layout inside what SGX CPUs can address and what can be measured in reasonable time.
MAX_HEAP = 1 * TIB
MAX_STACK = 1 * GIB
MAX_THREADS = 4096

_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


class DlopenMode(enum.IntEnum):
    """Whether the program may load shared libraries after start, as SCONE_ALLOW_DLOPEN says (0, 1, 2)."""

    OFF = 0
    """No dlopen after start: every library the program uses is loaded before the enclave starts it."""
    PROTECTED = 1
    """dlopen allowed for libraries in an authenticated or encrypted region (covered by the FSPF tag)."""
    UNPROTECTED = 2
    """dlopen allowed for any library: unsafe, for development only."""

    @property
    def label(self) -> str:
        """The name used on the command line and in JSON, such as ``protected``."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | DlopenMode) -> DlopenMode:
        """Read a mode from its name (``off``, ``protected``, ``unprotected``) or SCONE's number (0, 1, 2)."""
        if isinstance(value, DlopenMode):
            return value
        text = str(value).strip().lower()
        for mode in cls:
            if text in (mode.label, str(mode.value)):
                return mode
        raise UsageError(
            f"dlopen mode '{value}' is not known; use off (0), protected (1) or unprotected (2)."
        )


def parse_size(value: str | int, what: str = "size") -> int:
    """Read a byte count written as SCONE writes them: ``4096``, ``64K``, ``64M``, ``1G``, ``1T`` (binary units).

    A trailing ``B`` or ``iB`` is accepted (``64MB``, ``64MiB``); the result is the number of bytes.
    """
    if isinstance(value, bool):
        raise UsageError(f"{what} '{value}' is not a size; give bytes or a number with K, M, G or T, like 64M.")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{what} {value} is negative; give a size such as 64M.")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise UsageError(
            f"{what} '{value}' is not a size; give bytes or a number with K, M, G or T, like 64M."
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(n: int) -> str:
    """Write a byte count in the shortest exact SCONE notation: ``67108864`` -> ``64M``."""
    for suffix, unit in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _page_round_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass(frozen=True)
class EnclaveSettings:
    """The settings that shape the enclave besides its code; each one is part of MRENCLAVE.

    ``heap`` and ``stack`` (per thread) are byte counts, multiples of the 4 KiB page; ``threads`` is
    the number of enclave threads (TCS); ``dlopen`` says what may be loaded after start; ``debug``
    makes a debug enclave, whose memory a debugger can read (never for production).
    """

    heap: int = DEFAULT_HEAP
    stack: int = DEFAULT_STACK
    threads: int = DEFAULT_THREADS
    dlopen: DlopenMode = DlopenMode.OFF
    debug: bool = False

    def __post_init__(self) -> None:
        for what, value, limit in (("heap", self.heap, MAX_HEAP), ("stack", self.stack, MAX_STACK)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"enclave {what} size must be a number of bytes, not {value!r}.")
            if value < PAGE_SIZE or value % PAGE_SIZE:
                raise UsageError(
                    f"enclave {what} size {value} is not a positive multiple of 4096 bytes; "
                    "give a size such as 64M."
                )
            if value > limit:
                raise UsageError(
                    f"enclave {what} size {format_size(value)} is larger than the supported "
                    f"{format_size(limit)}; give a smaller size."
                )
        if not isinstance(self.threads, int) or isinstance(self.threads, bool):
            raise UsageError(f"enclave thread count must be a whole number, not {self.threads!r}.")
        if not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(
                f"enclave thread count {self.threads} is outside 1..{MAX_THREADS}; give a count in that range."
            )
        if not isinstance(self.dlopen, DlopenMode):
            object.__setattr__(self, "dlopen", DlopenMode.parse(self.dlopen))
        if not isinstance(self.debug, bool):
            raise UsageError(f"enclave debug flag must be true or false, not {self.debug!r}.")

    @classmethod
    def from_options(
        cls,
        heap: str | int | None = None,
        stack: str | int | None = None,
        threads: int | None = None,
        dlopen: str | int | DlopenMode | None = None,
        debug: bool | None = None,
    ) -> EnclaveSettings:
        """Settings from user-supplied values (``None`` keeps the default); sizes are rounded up to pages."""
        return cls(
            heap=DEFAULT_HEAP if heap is None else _page_round_up(parse_size(heap, "heap size")),
            stack=DEFAULT_STACK if stack is None else _page_round_up(parse_size(stack, "stack size")),
            threads=DEFAULT_THREADS if threads is None else threads,
            dlopen=DlopenMode.OFF if dlopen is None else DlopenMode.parse(dlopen),
            debug=False if debug is None else debug,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: sizes in bytes, the dlopen mode by name."""
        return {
            "heap": self.heap,
            "stack": self.stack,
            "threads": self.threads,
            "dlopen": self.dlopen.label,
            "debug": self.debug,
        }
