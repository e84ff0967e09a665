"""A layer cache shared by the jobs of a batch, where a missing entry is made by one job while the others wait.

``LayerCache`` alone is safe for concurrent processes, but two jobs that miss the same base layer at the same
moment would both seal it. ``SharedLayerCache`` takes an exclusive ``flock`` on the entry's name when a lookup
misses and holds it until the entry is stored; another job (process or thread) that misses the same entry
waits for the lock and then finds the entry. So a base layer shared by many images is sealed (and its headers
scanned) once, even when the jobs start together.

The cache's callers (``LayerBuilder.build`` and the analyzer's header pass) look an entry up, make it, store
it, and only then look up the next one; so each thread holds at most one lock, and it gives that lock up when
it stores the entry or looks up another (an entry that is never stored, like a layer holding the plaintext of
an encrypted program, is released that way). Locks are advisory and die with their process; a wait is bounded
(``wait_limit``) so that an unforeseen holder can only cost duplicate work.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sconify.analyze.files import LayerHeaders
from sconify.build.cache import CachedLayer, LayerCache

log = logging.getLogger(__name__)

WAIT_LIMIT = 1800.0


class SharedLayerCache(LayerCache):
    """A ``LayerCache`` whose misses are made once across processes; ``waited`` counts the waits."""

    def __init__(self, root: Path, wait_limit: float = WAIT_LIMIT) -> None:
        super().__init__(root)
        self.locks = self.root / "locks"
        self.locks.mkdir(exist_ok=True, mode=0o700)
        self.wait_limit = wait_limit
        self.waited = 0
        self._guard = threading.Lock()
        self._held: dict[int, tuple[str, int]] = {}  # thread ident -> (lock name, fd)

    # -- locks --------------------------------------------------------------------------------------------

    def _release_mine(self, name: str | None = None) -> None:
        with self._guard:
            held = self._held.get(threading.get_ident())
            if held is None or (name is not None and held[0] != name):
                return
            del self._held[threading.get_ident()]
        self._unlock(held[1])

    @staticmethod
    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _lock(self, name: str) -> int | None:
        """Take the lock ``name``, waiting for another holder; None when the wait limit passed."""
        fd = os.open(self.locks / name, os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + self.wait_limit
        step = 0.02
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    waited = True
                    with self._guard:
                        self.waited += 1
                if time.monotonic() >= deadline:
                    log.warning("gave up waiting for another job to make cache entry %s; making it here", name)
                    os.close(fd)
                    return None
                time.sleep(step)
                step = min(step * 1.5, 0.25)
        with self._guard:
            self._held[threading.get_ident()] = (name, fd)
        return fd

    def release_all(self) -> None:
        """Give up every lock this process holds (at the end of a job)."""
        with self._guard:
            held = list(self._held.values())
            self._held.clear()
        for _, fd in held:
            self._unlock(fd)

    # -- sealed layers ------------------------------------------------------------------------------------

    def lookup(self, key: str) -> CachedLayer | None:
        self._release_mine()
        hit = super().lookup(key)
        if hit is not None:
            return hit
        if self._lock(f"layer-{key}") is None:
            return None
        again = super().lookup(key)  # made by the job we waited for?
        if again is not None:
            self.misses -= 1
            self._release_mine()
        return again

    def store(self, key: str, layer: CachedLayer, blob_tmp: Path | None) -> None:
        try:
            super().store(key, layer, blob_tmp)
        finally:
            self._release_mine(f"layer-{key}")

    # -- header scans -------------------------------------------------------------------------------------

    def get(self, digest: str) -> LayerHeaders | None:
        self._release_mine()
        hit = super().get(digest)
        if hit is not None:
            return hit
        if self._lock(f"headers-{digest.replace(':', '-')}") is None:
            return None
        again = super().get(digest)
        if again is not None:
            self._release_mine()
        return again

    def put(self, digest: str, headers: LayerHeaders) -> None:
        try:
            super().put(digest, headers)
        finally:
            self._release_mine(f"headers-{digest.replace(':', '-')}")

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "waited": self.waited}
