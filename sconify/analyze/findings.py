"""Problems (why an image cannot be converted), warnings and notes that the analysis reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Problem codes. UNSUPPORTED_ARCHITECTURE maps to UnsupportedError's exit code, every other one to
# ConversionError's (see docs/analysis.md).
UNSUPPORTED_ARCHITECTURE = "unsupported-architecture"
NO_COMMAND = "no-command"
MISSING_EXECUTABLE = "missing-executable"
SYMLINK_LOOP = "symlink-loop"
NOT_EXECUTABLE = "not-executable"
UNKNOWN_USER = "unknown-user"
MISSING_LIBRARY = "missing-library"
MISSING_LOADER = "missing-loader"
BAD_ELF = "bad-elf"

PROBLEM_CODES = (UNSUPPORTED_ARCHITECTURE, NO_COMMAND, MISSING_EXECUTABLE, SYMLINK_LOOP, NOT_EXECUTABLE,
                 UNKNOWN_USER, MISSING_LIBRARY, MISSING_LOADER, BAD_ELF)


@dataclass(frozen=True)
class Finding:
    """One problem, warning or note: a stable code, one sentence for people, and the path it is about."""

    code: str
    message: str
    path: str | None = None
    rule: str | None = None  # for notes contributed by a rule

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "path": self.path}
        if self.rule is not None:
            out["rule"] = self.rule
        return out
