"""Measuring an enclave: MRENCLAVE and the SGXS export for a runtime, an executable and settings."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sconify.enclave._files import write_atomic
from sconify.enclave.layout import EnclaveLayout, build_layout
from sconify.enclave.settings import EnclaveSettings, format_size
from sconify.enclave.sgxs import mrenclave


@dataclass(frozen=True)
class Measurement:
    """The result of measuring an enclave: its MRENCLAVE and the layout it was computed from."""

    mrenclave: bytes
    layout: EnclaveLayout

    @property
    def settings(self) -> EnclaveSettings:
        """The settings the enclave was laid out with."""
        return self.layout.settings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: ``mrenclave`` as hex, sizes in bytes, the regions in address order."""
        return {
            "mrenclave": self.mrenclave.hex(),
            "enclave_size": self.layout.size,
            "ssa_frame_size": self.layout.ssa_frame_size,
            "pages": self.layout.pages,
            "measured_pages": self.layout.measured_pages,
            "sgxs_length": self.layout.sgxs_length,
            "settings": self.settings.to_dict(),
            "regions": [r.to_dict() for r in self.layout.regions()],
        }

    def summary_fields(self) -> list[tuple[str, Any]]:
        """``name: value`` pairs for people."""
        s = self.settings
        return [
            ("mrenclave", self.mrenclave.hex()),
            ("enclave size", f"{format_size(self.layout.size)} ({self.layout.size:#x})"),
            ("pages", f"{self.layout.pages} added, {self.layout.measured_pages} measured"),
            ("heap", format_size(s.heap)),
            ("stack", f"{format_size(s.stack)} per thread"),
            ("threads", s.threads),
            ("dlopen", s.dlopen.label),
            ("debug", "yes" if s.debug else "no"),
        ]

    def iter_sgxs(self) -> Iterator[bytes | memoryview]:
        """The canonical SGXS stream; its SHA-256 is ``mrenclave``."""
        return self.layout.iter_sgxs()

    def sgxs_bytes(self) -> bytes:
        """The SGXS stream in memory, checked on the way to hash to MRENCLAVE."""
        h = hashlib.sha256()
        parts = []
        for chunk in self.iter_sgxs():
            h.update(chunk)
            parts.append(bytes(chunk))
        if h.digest() != self.mrenclave:
            raise AssertionError("the SGXS stream does not hash to the measured MRENCLAVE")
        return b"".join(parts)

    def write_sgxs(self, path: Path, progress: Callable[[int], object] | None = None) -> None:
        """Write the SGXS stream to ``path`` atomically, checking on the way that it hashes to MRENCLAVE.

        ``progress``, if given, is called with the size of each chunk written.
        """
        h = hashlib.sha256()

        def hashed() -> Iterator[bytes | memoryview]:
            for chunk in self.iter_sgxs():
                h.update(chunk)
                yield chunk
                if progress is not None:
                    progress(len(chunk))
            # Checked before the rename: a stream that disagrees with the measurement is never left behind.
            if h.digest() != self.mrenclave:
                raise AssertionError("the SGXS stream does not hash to the measured MRENCLAVE")

        write_atomic(path, hashed(), what="SGXS file")


def measure(
    runtime: bytes,
    executable: bytes | None,
    settings: EnclaveSettings,
    *,
    runtime_name: str = "the runtime",
    executable_name: str = "the executable",
) -> Measurement:
    """Measure the enclave for the runtime ELF, the program's ELF (``None``: none) and the settings.

    This is the function the converter calls; the result depends on nothing but the bytes and the
    settings (the names only appear in error messages).
    """
    layout = build_layout(runtime, executable, settings, runtime_name=runtime_name,
                          executable_name=executable_name)
    return Measurement(mrenclave(layout.iter_sgxs()), layout)
