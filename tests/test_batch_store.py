"""The SQLite job store: idempotent submission, atomic claims across processes, leases, retries and release."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time
from pathlib import Path

from sconify.batch.jobs import JobSpec
from sconify.batch.store import FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore


def _spec(n: int) -> JobSpec:
    return JobSpec(name=f"job{n}", source=f"oci:/images:{n}", destination=f"oci:/out/{n}", policy_out=f"/p/{n}")


def test_submit_returns_the_live_job_with_the_same_key(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    first, created = store.submit(_spec(1), "k1")
    assert created
    assert store.submit(_spec(1), "k1") == (first, False)  # queued
    job = store.claim("w", 60)
    assert job is not None and job.id == first and job.status == RUNNING and job.attempts == 1
    assert store.submit(_spec(1), "k1") == (first, False)  # running
    store.succeed(first, {"digest": "sha256:x"})
    assert store.submit(_spec(1), "k1") == (first, False)  # succeeded: done before
    forced, created = store.submit(_spec(1), "k1", force=True)
    assert created and forced != first
    job = store.get(first)
    assert job is not None and job.status == SUCCEEDED and job.result == {"digest": "sha256:x"}
    assert job.spec == _spec(1).to_json()


def test_a_failed_job_may_be_submitted_again(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    job_id, _ = store.submit(_spec(1), "k")
    assert store.claim("w", 60) is not None
    store.fail(job_id, "the image does not exist")
    failed = store.get(job_id)
    assert failed is not None and failed.status == FAILED and failed.error == "the image does not exist"
    again, created = store.submit(_spec(1), "k")
    assert created and again != job_id
    assert store.counts() == {QUEUED: 1, RUNNING: 0, SUCCEEDED: 0, FAILED: 1}
    assert [j.id for j in store.list(FAILED)] == [job_id]
    assert [j.id for j in store.list()] == [job_id, again]


def test_expired_leases_are_claimable_and_heartbeats_extend_them(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    job_id, _ = store.submit(_spec(1), "k")
    assert store.claim("a", 0.3) is not None
    assert store.claim("b", 60) is None  # held
    time.sleep(0.2)
    assert store.heartbeat(job_id, "a")
    time.sleep(0.2)
    assert store.claim("b", 60) is None  # the heartbeat renewed the lease
    time.sleep(0.35)
    taken = store.claim("b", 60)
    assert taken is not None and taken.worker == "b" and taken.attempts == 2
    assert not store.heartbeat(job_id, "a")  # a lost it


def test_release_and_retry(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    job_id, _ = store.submit(_spec(1), "k")
    assert store.claim("a", 60) is not None
    assert not store.release(job_id, "b")
    assert store.release(job_id, "a")
    job = store.get(job_id)
    assert job is not None and job.status == QUEUED and job.attempts == 0 and job.worker is None
    assert store.claim("a", 60) is not None
    store.fail(job_id, "registry unreachable", retry_at=time.time() + 0.3)
    assert store.claim("a", 60) is None  # not before its retry time
    time.sleep(0.35)
    job = store.claim("a", 60)
    assert job is not None and job.attempts == 2 and job.error == "registry unreachable"


def test_claim_can_be_limited_to_some_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    ids = [store.submit(_spec(n), f"k{n}")[0] for n in range(3)]
    job = store.claim("w", 60, only=[ids[2]])
    assert job is not None and job.id == ids[2]
    assert store.claim("w", 60, only=[ids[2]]) is None
    assert store.claim("w", 60, only=[]) is None


def test_the_store_file_is_private(tmp_path: Path) -> None:
    JobStore(tmp_path / "state" / "jobs.db")
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "jobs.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


def _claim_all(path: str, worker: str, out: multiprocessing.Queue) -> None:
    store = JobStore(path)
    got = []
    while (job := store.claim(worker, 60)) is not None:
        got.append(job.id)
        store.succeed(job.id, {"by": worker})
    out.put(got)


def test_concurrent_claims_from_processes_take_each_job_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = JobStore(path)
    ids = {store.submit(_spec(n), f"k{n}")[0] for n in range(60)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(path), f"w{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    flat = [i for part in claimed for i in part]
    assert sorted(flat) == sorted(ids)  # every job once, none twice
    assert store.counts()[SUCCEEDED] == 60
    assert all(j.attempts == 1 for j in store.list())
