"""The durable job store of batch conversion and the registry service: one SQLite file, safe for many processes.

The API is small and stable (other parts of sconify build on it):

``JobStore(path)``
    Opens (and creates) the store; the file and its directory are private to the user (0600/0700).
``submit(spec, key, *, force=False) -> (job_id, created)``
    Adds a job, unless a job with the same idempotency ``key`` is queued, running or succeeded: that job's
    id is returned with ``created=False``. A failed job may be resubmitted (a new job is made). ``force``
    makes a new job even when one with the key succeeded (still not while one is queued or running).
``claim(worker, lease_seconds, *, only=None) -> Job | None``
    Atomically takes the oldest job that is queued (and whose retry time has come) or whose lease expired
    (its worker stopped sending heartbeats), marks it running for ``worker`` until now + ``lease_seconds``
    and counts an attempt. ``only`` restricts the choice to some job ids.
``heartbeat(job_id, worker) -> bool``
    Extends the lease by the job's lease length; False when ``worker`` no longer holds the job.
``release(job_id, worker) -> bool``
    Gives a running job back to the queue without counting a failure (its worker stops, or died without
    finishing); the attempt it used is given back too.
``succeed(job_id, result)`` / ``fail(job_id, error, retry_at)``
    Records the outcome. ``fail`` with ``retry_at`` (a Unix time) queues the job again from that time on;
    without, the job is failed for good.
``get(job_id) -> Job | None``, ``list(status=None) -> list[Job]``, ``counts() -> dict[status, n]``.

A job carries its id, key, spec (JSON), status (queued, running, succeeded, failed), attempts, error, result
(JSON), timestamps and worker. The file is in WAL mode; each thread (and each process) uses its own
connection, and every change runs in ``BEGIN IMMEDIATE`` so that two claims never take the same job.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sconify.errors import SconifyError

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    worker TEXT,
    lease_seconds REAL,
    lease_until REAL,
    retry_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (key, status);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, id);
CREATE TABLE IF NOT EXISTS store_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(SconifyError):
    """The job store cannot be opened or used (a damaged file, a newer format, a read-only directory)."""

    exit_code = 1


@dataclass(frozen=True)
class Job:
    """One job as the store holds it."""

    id: int
    key: str
    spec: dict[str, Any]
    status: str
    attempts: int
    error: str | None
    result: dict[str, Any] | None
    worker: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    lease_until: float | None = None
    retry_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in (SUCCEEDED, FAILED)


def _spec_json(spec: Any) -> str:
    data = spec.to_json() if hasattr(spec, "to_json") else spec
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


class JobStore:
    """A job store in the SQLite file ``path`` (see the module's docstring for the API)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fresh = not self.path.exists()
            if fresh:  # created private: the specs name key files and the results hold policy paths
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            conn = self._conn()
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM store_meta WHERE name = 'schema'").fetchone()
            if row is None:
                conn.execute("INSERT OR IGNORE INTO store_meta (name, value) VALUES ('schema', ?)",
                             (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"the job store {str(self.path)!r} was written by a newer sconify (format {row[0]}); "
                    "use that version or another --store."
                )
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"the job store {str(self.path)!r} cannot be used ({exc}); give another --store or remove the file."
            ) from None
        except PermissionError as exc:
            raise StoreError(
                f"the job store {str(self.path)!r} cannot be written ({exc.strerror}); give another --store."
            ) from None

    # -- connections -------------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork: SQLite connections must not cross processes)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    @contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        conn = conn or self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- the API -----------------------------------------------------------------------------------------

    def submit(self, spec: Any, key: str, *, force: bool = False) -> tuple[int, bool]:
        """Add a job for ``spec`` unless one with ``key`` is queued, running or (without force) succeeded."""
        now = time.time()
        live = (QUEUED, RUNNING) if force else (QUEUED, RUNNING, SUCCEEDED)
        marks = ",".join("?" * len(live))
        with self._write() as conn:
            row = conn.execute(
                f"SELECT id FROM jobs WHERE key = ? AND status IN ({marks}) ORDER BY id DESC LIMIT 1", (key, *live)
            ).fetchone()
            if row is not None:
                return int(row[0]), False
            cur = conn.execute(
                "INSERT INTO jobs (key, spec, status, created_at, updated_at) VALUES (?, ?, 'queued', ?, ?)",
                (key, _spec_json(spec), now, now),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid), True

    def claim(self, worker: str, lease_seconds: float, *, only: Collection[int] | None = None) -> Job | None:
        """Take the oldest claimable job for ``worker`` (see the module's docstring)."""
        now = time.time()
        where = ("((status = 'queued' AND (retry_at IS NULL OR retry_at <= ?)) "
                 "OR (status = 'running' AND lease_until < ?))")
        args: list[Any] = [now, now]
        if only is not None:
            ids = sorted({int(i) for i in only})
            if not ids:
                return None
            where += f" AND id IN ({','.join('?' * len(ids))})"
            args.extend(ids)
        with self._write() as conn:
            row = conn.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY id LIMIT 1", args).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = 'running', worker = ?, lease_seconds = ?, lease_until = ?, retry_at = NULL, "
                "attempts = attempts + 1, started_at = ?, updated_at = ? WHERE id = ?",
                (worker, lease_seconds, now + lease_seconds, now, now, row[0]),
            )
        job = self.get(int(row[0]))
        assert job is not None
        return job

    def heartbeat(self, job_id: int, worker: str) -> bool:
        """Extend the lease of a running job that ``worker`` holds; False if it holds it no longer."""
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET lease_until = ? + lease_seconds, updated_at = ? "
                "WHERE id = ? AND worker = ? AND status = 'running'",
                (now, now, job_id, worker),
            )
            return cur.rowcount == 1

    def release(self, job_id: int, worker: str) -> bool:
        """Queue a running job of ``worker`` again, giving back the attempt; False if it holds it no longer."""
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, "
                "attempts = MAX(attempts - 1, 0), updated_at = ? WHERE id = ? AND worker = ? AND status = 'running'",
                (now, job_id, worker),
            )
            return cur.rowcount == 1

    def succeed(self, job_id: int, result: dict[str, Any]) -> None:
        """Record that the job succeeded with ``result``."""
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'succeeded', result = ?, error = NULL, lease_until = NULL, retry_at = NULL, "
                "finished_at = ?, updated_at = ? WHERE id = ?",
                (json.dumps(result, sort_keys=True, default=str), now, now, job_id),
            )

    def fail(self, job_id: int, error: str, retry_at: float | None = None) -> None:
        """Record a failure: for good, or queued again from ``retry_at`` (a Unix time) on."""
        now = time.time()
        with self._write() as conn:
            if retry_at is None:
                conn.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, lease_until = NULL, retry_at = NULL, "
                    "finished_at = ?, updated_at = ? WHERE id = ?",
                    (error, now, now, job_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET status = 'queued', error = ?, worker = NULL, lease_until = NULL, retry_at = ?, "
                    "updated_at = ? WHERE id = ?",
                    (error, retry_at, now, job_id),
                )

    def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        row = self._conn().execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, status: str | None = None) -> builtins.list[Job]:
        """Every job (or those with ``status``), oldest first."""
        if status is None:
            rows = self._conn().execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY id").fetchall()
        else:
            rows = self._conn().execute(f"SELECT {_COLUMNS} FROM jobs WHERE status = ? ORDER BY id",
                                        (status,)).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each status (every status is present, maybe with 0)."""
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            out[status] = int(n)
        return out

    # -- helpers for runners (not part of the stable API) --------------------------------------------------

    def jobs(self, ids: Collection[int]) -> builtins.list[Job]:
        """The jobs with these ids, in id order (missing ids are left out)."""
        wanted = sorted({int(i) for i in ids})
        out: builtins.list[Job] = []
        for start in range(0, len(wanted), 500):  # SQLite limits the number of parameters
            part = wanted[start : start + 500]
            rows = self._conn().execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({','.join('?' * len(part))}) ORDER BY id", part
            )
            out.extend(_job(r) for r in rows)
        return out


_COLUMNS = ("id, key, spec, status, attempts, error, result, worker, created_at, updated_at, started_at, finished_at, "
            "lease_until, retry_at")


def _job(row: tuple[Any, ...]) -> Job:
    return Job(
        id=int(row[0]),
        key=row[1],
        spec=json.loads(row[2]),
        status=row[3],
        attempts=int(row[4]),
        error=row[5],
        result=json.loads(row[6]) if row[6] else None,
        worker=row[7],
        created_at=row[8],
        updated_at=row[9],
        started_at=row[10],
        finished_at=row[11],
        lease_until=row[12],
        retry_at=row[13],
    )
