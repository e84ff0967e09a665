"""Batch jobs on many machines: the Celery app (Redis broker), the task that runs one job on a worker, and the
client side of ``sconify batch --broker`` that sends the jobs and collects their outcomes.

Delivery is at least once: tasks are acknowledged late (after they finish) and rejected when their worker
process is lost, so a job whose worker dies is delivered again (to another worker once the broker's
visibility timeout passes). Jobs are idempotent: a worker keeps each job's result in Redis under the job's
key (``sconify:batch:result:<key>``), so a redelivered or resent job returns the earlier result instead of
pushing again; while a job runs, its worker holds a lock on the key (``sconify:batch:lock:<key>``) that it
renews, so a copy delivered meanwhile waits for the first to finish (or, if that worker died, for its lock
to lapse) instead of running twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sconify.batch.jobs import JobSpec
from sconify.batch.runner import (
    HOST,
    Entry,
    ProgressCallback,
    Running,
    Snapshot,
    internal_error_text,
    recover_stale,
    run_job,
    snapshot,
)
from sconify.batch.store import FAILED, SUCCEEDED, JobStore
from sconify.errors import NetworkError, SconifyError, UsageError

log = logging.getLogger(__name__)

TASK_NAME = "sconify.batch.convert"
QUEUE = "sconify-batch"
RESULT_PREFIX = "sconify:batch:result:"
LOCK_PREFIX = "sconify:batch:lock:"
RESULT_TTL = 30 * 86400  # seconds a job's result stays in Redis (and a repeated job is answered from it)
VISIBILITY_TIMEOUT = 900.0  # seconds after which the broker hands an unacknowledged job to another worker
RESTORE_INTERVAL = 10.0  # how often a worker looks for such jobs
LOCK_LEASE = 60.0  # seconds a job stays locked after its worker stopped renewing the lock
NETWORK_RETRIES = 2
CLIENT_LEASE = 3600.0
POLL_SECONDS = 0.5


def _celery() -> Any:
    try:
        import celery
    except ImportError:
        raise UsageError(
            "running batches on many machines needs Celery with Redis: pip install 'celery[redis]'."
        ) from None
    return celery


def check_broker(url: str) -> Any:
    """A Redis client for the broker URL, after a PING; a NetworkError names the URL when it does not answer."""
    if not url.startswith(("redis://", "rediss://")):
        raise UsageError(f"the broker {url!r} is not a Redis URL; give redis://HOST:PORT/DB.")
    _celery()
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise NetworkError(f"the broker {url} does not answer ({exc}); start Redis there or fix --broker.") from None
    return client


def make_app(broker: str, *, visibility_timeout: float = VISIBILITY_TIMEOUT, restore_interval: float | None = None,
             cache: str | None = None, logs: str | None = None, lease: float = LOCK_LEASE) -> Any:
    """The Celery app of sconify's batch jobs on ``broker`` (also the result backend).

    ``cache``, ``logs`` and ``lease`` are the worker's own settings; a client leaves them out.
    """
    celery = _celery()
    app = celery.Celery("sconify", broker=broker, backend=broker, set_as_current=False)
    interval = restore_interval if restore_interval is not None else min(RESTORE_INTERVAL, visibility_timeout / 2)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        result_expires=7 * 86400,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": max(1, int(interval)),
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        sconify_cache=cache,
        sconify_logs=logs,
        sconify_lease=lease,
    )
    app.task(name=TASK_NAME, bind=True)(convert_task)
    return app


# -- the worker side ---------------------------------------------------------------------------------------

_clients: dict[tuple[int, str], Any] = {}
_caches: dict[str, Any] = {}


def _redis(url: str) -> Any:
    import redis

    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=60)
    return _clients[key]


def _cache(root: str | None) -> Any:
    """This worker's ``SharedLayerCache`` (one per process)."""
    from sconify.batch.sharing import SharedLayerCache

    if not root:
        return None
    if root not in _caches:
        _caches[root] = SharedLayerCache(Path(root))
    return _caches[root]


def convert_task(task: Any, spec_data: dict[str, Any], key: str) -> dict[str, Any]:
    """Run one job on this worker, or answer with the result an earlier run of the same key left in Redis.

    Returns ``{"status": "succeeded", "result": {...}, "reused": bool}`` or ``{"status": "failed", "error":
    "...", "exit_code": n}``; a user error is an outcome, not a task failure, so it is not redelivered.
    """
    conf = task.app.conf
    client = _redis(conf.broker_url)
    worker = f"{task.request.hostname or socket.gethostname()}/{os.getpid()}"
    earlier = client.get(RESULT_PREFIX + key)
    if earlier is not None:
        return {"status": SUCCEEDED, "result": json.loads(earlier), "reused": True, "worker": worker}
    lease = float(conf.sconify_lease or LOCK_LEASE)
    lock = client.lock(LOCK_PREFIX + key, timeout=lease, sleep=0.25, blocking=True, thread_local=False)
    lock.acquire()  # waits while another worker runs this job; its lock lapses if it died
    spec = JobSpec.from_json(spec_data)
    log_file = Path(conf.sconify_logs) / f"job-{key[:16]}-{spec.name}.log" if conf.sconify_logs else None
    try:
        earlier = client.get(RESULT_PREFIX + key)
        if earlier is not None:
            return {"status": SUCCEEDED, "result": json.loads(earlier), "reused": True, "worker": worker}
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(lease / 3):
                try:
                    lock.reacquire()
                except Exception as exc:  # the lock lapsed: another worker may take the job over
                    log.warning("job %s: could not renew its lock (%s)", spec.name, exc)

        renewer = threading.Thread(target=renew, name="sconify-lock", daemon=True)
        renewer.start()
        try:
            result = run_job(spec, cache=_cache(conf.sconify_cache), log_file=log_file)
        except NetworkError as exc:
            if task.request.retries < NETWORK_RETRIES:
                raise task.retry(countdown=5 * (task.request.retries + 1), max_retries=NETWORK_RETRIES) from None
            return {"status": FAILED, "error": exc.message, "exit_code": exc.exit_code, "worker": worker}
        except SconifyError as exc:
            return {"status": FAILED, "error": exc.message, "exit_code": exc.exit_code, "worker": worker}
        except Exception as exc:
            return {"status": FAILED, "error": internal_error_text(exc, f"{HOST}:{log_file}"), "exit_code": 70,
                    "worker": worker}
        finally:
            stop.set()
            renewer.join(timeout=5)
        result.update(worker=worker, log=f"{HOST}:{log_file}" if log_file else None)
        client.set(RESULT_PREFIX + key, json.dumps(result, sort_keys=True, default=str), ex=RESULT_TTL)
        return {"status": SUCCEEDED, "result": result, "reused": False, "worker": worker}
    finally:
        try:
            lock.release()
        except Exception:  # lapsed and maybe taken by another worker: nothing of ours to release
            log.debug("lock of job %s was no longer held", key[:16])


def run_worker(broker: str, *, concurrency: int, cache: str | None, logs: str, name: str | None = None,
               visibility_timeout: float = VISIBILITY_TIMEOUT, lease: float = LOCK_LEASE,
               loglevel: str = "WARNING") -> int:
    """Run a Celery worker for batch jobs in this process until it is stopped; returns its exit code."""
    check_broker(broker)
    Path(logs).mkdir(parents=True, exist_ok=True, mode=0o700)
    app = make_app(broker, visibility_timeout=visibility_timeout, cache=cache, logs=logs, lease=lease)
    worker = app.Worker(
        hostname=name or f"sconify-{os.getpid()}@{HOST}",
        concurrency=concurrency,
        pool="prefork",
        queues=[QUEUE],
        loglevel=loglevel,
        quiet=True,
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    worker.start()
    return int(getattr(worker, "exitcode", 0) or 0)


# -- the client side ---------------------------------------------------------------------------------------


class DistributedRunner:
    """Sends the entries' unfinished jobs to the broker and records their outcomes in the local store."""

    def __init__(self, store: JobStore, entries: Sequence[Entry], broker: str,
                 on_progress: ProgressCallback | None = None) -> None:
        self.store = store
        self.entries = list(entries)
        self.broker = broker
        self.on_progress = on_progress
        self.ids = sorted({e.job_id for e in self.entries if e.job_id is not None})
        self.me = f"{HOST}/{os.getpid()}/client"
        self._tasks: dict[int, Any] = {}
        self._started: dict[int, tuple[float, str]] = {}

    def run(self) -> None:
        check_broker(self.broker)
        app = make_app(self.broker)
        recover_stale(self.store, self.ids)
        try:
            while True:
                job = self.store.claim(self.me, CLIENT_LEASE, only=self.ids)
                if job is None:
                    break
                self._tasks[job.id] = app.send_task(TASK_NAME, args=[job.spec, job.key], queue=QUEUE)
            self._wait(app)
        except BaseException:
            for job_id in list(self._tasks):  # the messages stay on the broker; --resume sends them again
                self.store.release(job_id, self.me)
            raise

    def _wait(self, app: Any) -> None:
        last_beat = time.monotonic()
        while True:
            for job_id, result in list(self._tasks.items()):
                state = result.state
                if state == "SUCCESS":
                    self._record(job_id, result.result)
                elif state in ("FAILURE", "REVOKED"):
                    self.store.fail(job_id, f"the task failed on the worker: {result.result!r}")
                elif state == "STARTED":  # again after a redelivery: then on another worker
                    info = result.info if isinstance(result.info, dict) else {}
                    host = str(info.get("hostname") or "a worker")
                    if self._started.get(job_id, (0.0, ""))[1] != host:
                        self._started[job_id] = (time.time(), host)
                    continue
                else:
                    continue
                result.forget()
                del self._tasks[job_id]
                self._started.pop(job_id, None)
            if time.monotonic() - last_beat > CLIENT_LEASE / 3:
                for job_id in self._tasks:
                    self.store.heartbeat(job_id, self.me)
                last_beat = time.monotonic()
            if self.on_progress:
                self.on_progress(self._snapshot())
            if not self._tasks:
                return
            time.sleep(POLL_SECONDS)

    def _record(self, job_id: int, outcome: Any) -> None:
        if not isinstance(outcome, dict) or outcome.get("status") not in (SUCCEEDED, FAILED):
            self.store.fail(job_id, f"the worker answered with something unexpected: {outcome!r}")
        elif outcome["status"] == SUCCEEDED:
            result = dict(outcome.get("result") or {})
            result["reused"] = bool(outcome.get("reused"))
            self.store.succeed(job_id, result)
        else:
            self.store.fail(job_id, str(outcome.get("error") or "failed on the worker"))

    def _snapshot(self) -> Snapshot:
        jobs = {j.id: j for j in self.store.jobs(self.ids)}
        base = snapshot(self.entries, jobs)
        names = {e.job_id: e.name for e in self.entries}
        now = time.time()
        running = tuple(Running(names.get(i, str(i)), host, now - t, jobs[i].attempts if i in jobs else 1)
                        for i, (t, host) in sorted(self._started.items()))
        waiting = len(self._tasks) - len(running)
        note = f"{waiting} waiting for a worker" if waiting > 0 else None
        return Snapshot(base.total, base.succeeded, base.failed, running, note)
