"""The batch's shared layer cache: a job that misses an entry another job is making waits for it and finds it,
a lock is given up when its holder moves on, and a wait is bounded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sconify.batch.sharing import SharedLayerCache
from sconify.build.cache import CachedLayer
from sconify.image.model import Descriptor

KEY = "ab" * 32


def _layer(n: int = 1) -> CachedLayer:
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + f"{n:064x}", 100 + n)
    return CachedLayer(desc, "sha256:" + f"{n + 1:064x}", "reused", (), None, None)


def _lookup_in_thread(cache: SharedLayerCache, key: str) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(cache.lookup(key)))
    thread.start()
    return thread, got


def test_a_second_job_waits_for_the_entry_the_first_is_making(tmp_path: Path) -> None:
    maker, waiter = SharedLayerCache(tmp_path), SharedLayerCache(tmp_path)  # as two processes would
    assert maker.lookup(KEY) is None  # a miss: this job makes the entry and holds its lock
    thread, got = _lookup_in_thread(waiter, KEY)
    time.sleep(0.3)
    assert thread.is_alive() and got == []  # waiting, not sealing the same layer again
    maker.store(KEY, _layer(), None)
    thread.join(timeout=5)
    assert got == [_layer()]
    assert waiter.waited == 1 and waiter.hits == 1 and waiter.misses == 0


def test_a_lock_is_given_up_when_its_holder_looks_up_the_next_entry(tmp_path: Path) -> None:
    holder, other = SharedLayerCache(tmp_path), SharedLayerCache(tmp_path)
    assert holder.lookup(KEY) is None
    thread, got = _lookup_in_thread(other, KEY)
    time.sleep(0.2)
    assert thread.is_alive()
    # The holder did not store the entry (e.g. the layer held an encrypted program) and went on.
    assert holder.lookup("cd" * 32) is None
    thread.join(timeout=5)
    assert got == [None]  # the waiter makes the entry itself now
    holder.release_all()
    other.release_all()


def test_a_wait_is_bounded(tmp_path: Path) -> None:
    holder, other = SharedLayerCache(tmp_path), SharedLayerCache(tmp_path, wait_limit=0.3)
    assert holder.lookup(KEY) is None
    started = time.monotonic()
    assert other.lookup(KEY) is None
    assert 0.25 < time.monotonic() - started < 5
    holder.release_all()


def test_release_all_frees_every_lock_of_a_job(tmp_path: Path) -> None:
    holder, other = SharedLayerCache(tmp_path), SharedLayerCache(tmp_path, wait_limit=0.2)
    assert holder.get("sha256:" + "1" * 64) is None  # a header scan in progress
    holder.release_all()  # the job ended (failed) before it stored it
    assert other.get("sha256:" + "1" * 64) is None
    assert other.waited == 0  # no lock was left to wait for
