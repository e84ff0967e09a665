"""Running a batch on this machine: one job (``run_job``), the submission of a jobs file into the store, and the
local pool of worker processes that claim jobs from the store until the batch is done.

Conversions are CPU-bound Python, so the pool uses processes (spawned, so that no lock or connection of the
parent leaks into them); the SQLite store is the only state they share. A worker process holds a lease on its
job and renews it; when it dies, the parent queues the job again (up to ``max_attempts``), and a later run finds
jobs of a crashed run by their expired leases or dead worker processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sconify.batch.jobs import FILE_TRANSPORTS, JobSpec, job_key, key_identities, pin_source
from sconify.batch.store import FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobStore
from sconify.errors import NetworkError, SconifyError, UsageError
from sconify.image.reference import DOCKER

if TYPE_CHECKING:
    from sconify.build.cache import LayerCache

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
MAX_ATTEMPTS = 3
RETRY_BACKOFF = (5.0, 30.0)  # seconds before the 2nd and 3rd attempt of a job that met a network error
POLL_SECONDS = 0.2
RECOVER_SECONDS = 1.0
PIN_THREADS = 8
STOP_GRACE = 30.0
HOST = socket.gethostname()


# -- one job --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def job_log(path: Path | None):  # type: ignore[no-untyped-def]
    """Send sconify's log records (INFO and up) to ``path`` while the block runs."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("sconify")
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


def run_job(spec: JobSpec, *, cache: LayerCache | None, log_file: Path | None = None) -> dict[str, Any]:
    """Convert as ``spec`` says and return the result as JSON data (``ConvertResult.to_json`` plus timing).

    Raises what ``convert`` raises; the log file gets the story either way, with a traceback for a bug.
    """
    from sconify.convert import convert
    from sconify.image.model import Platform

    started = time.monotonic()
    with job_log(log_file):
        log.info("job %s: converting %s to %s (policy in %s)", spec.name, spec.source, spec.destination,
                 spec.policy_out)
        try:
            policy_out = Path(spec.policy_out)
            policy_out.absolute().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            destination = spec.destination_reference()
            if destination.transport in FILE_TRANSPORTS and destination.path:  # oci:out/{name} in a jobs file
                Path(destination.path).absolute().parent.mkdir(parents=True, exist_ok=True)
            result = convert(
                spec.source_reference(),
                destination,
                spec.convert_options(),
                policy_out=policy_out,
                fspf_key_file=_path(spec.fspf_key),
                enclave_key_file=_path(spec.enclave_key),
                sign_key_file=_path(spec.sign_key),
                secrets_file=_path(spec.secrets),
                inject_file=_path(spec.inject),
                platform=Platform.parse(spec.platform) if spec.platform else None,
                src_transport=spec.source_transport(),
                dest_transport=spec.dest_transport(),
                rules_dirs=[Path(r) for r in spec.rules],
                cache=cache,
            )
        except SconifyError as exc:
            log.error("job %s failed: %s", spec.name, exc.message)
            raise
        except BaseException as exc:
            if isinstance(exc, Exception):
                log.exception("job %s failed with an internal error", spec.name)
            else:
                log.error("job %s stopped (%s)", spec.name, type(exc).__name__)
            raise
        finally:
            release_all = getattr(cache, "release_all", None)  # a SharedLayerCache's locks end with the job
            if release_all is not None:
                release_all()
        data = result.to_json()
        data["seconds"] = round(time.monotonic() - started, 3)
        if spec.source_digest and data["source_digest"] != spec.source_digest:
            log.warning("job %s: %s was %s when the job was submitted and is %s now; converted what is there now",
                        spec.name, spec.source, spec.source_digest, data["source_digest"])
        log.info("job %s succeeded: %s, MRENCLAVE %s, %.1f s", spec.name, data["digest"], data["mrenclave"],
                 data["seconds"])
    return data


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def internal_error_text(exc: BaseException, log_file: Path | str | None) -> str:
    where = f"; the traceback is in {log_file}" if log_file else ""
    return f"internal error: {type(exc).__name__}: {exc} (a bug in sconify{where})"


# -- submission ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One job of a batch run: its name, and its id and key in the store (None when it could not be keyed)."""

    name: str
    spec: dict[str, Any]
    job_id: int | None
    key: str | None
    done_before: bool = False  # the store had a succeeded job with this key: not run again
    error: str | None = None  # why the job could not be submitted

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(str(data["name"]), dict(data["spec"]), data.get("job_id"), data.get("key"),
                   done_before=bool(data.get("done_before")), error=data.get("error"))


def _keyed(spec: JobSpec, pin: bool) -> tuple[JobSpec, str]:
    if pin:
        try:
            spec = pin_source(spec)
        except SconifyError as exc:  # the job itself will meet (and report) the problem
            log.info("job %s: the source's digest is not known before the job runs (%s)", spec.name, exc.message)
    return spec, job_key(spec, key_identities(spec))


def submit_all(store: JobStore, specs: Sequence[JobSpec], *, force: bool = False, pin: bool = True) -> list[Entry]:
    """Key and submit every spec (sources are resolved to digests in parallel); jobs already done keep their
    result. A spec that cannot be keyed (an unreadable key file) becomes an entry with its error."""

    def one(spec: JobSpec) -> tuple[JobSpec, str | None, str | None]:
        try:
            pinned, key = _keyed(spec, pin)
            return pinned, key, None
        except SconifyError as exc:
            return spec, None, exc.message

    # Resolving a registry tag is a round trip: those run in parallel; local layouts are read in a moment.
    remote = [s for s in specs if s.source_reference().transport == DOCKER]
    done: dict[int, tuple[JobSpec, str | None, str | None]] = {}
    if len(remote) > 1:
        with ThreadPoolExecutor(max_workers=min(PIN_THREADS, len(remote))) as pool:
            done = {id(s): r for s, r in zip(remote, pool.map(one, remote), strict=True)}
    keyed = [done.get(id(s)) or one(s) for s in specs]
    entries = []
    for spec, key, error in keyed:
        if key is None:
            entries.append(Entry(spec.name, spec.to_json(), None, None, error=error))
            continue
        job_id, created = store.submit(spec, key, force=force)
        job = store.get(job_id)
        done_before = not created and job is not None and job.status == SUCCEEDED
        entries.append(Entry(spec.name, spec.to_json(), job_id, key, done_before=done_before))
    return entries


# -- the record of a run, for --resume ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What a batch run submitted, kept beside the store so that ``--resume`` continues the same jobs."""

    jobs_file: str
    broker: str | None
    entries: tuple[Entry, ...]
    started: float
    finished: bool = False

    @staticmethod
    def path_for(state_dir: Path, jobs_file: Path) -> Path:
        tag = hashlib.sha256(str(Path(jobs_file).resolve()).encode()).hexdigest()[:16]
        return state_dir / "runs" / f"{Path(jobs_file).stem}-{tag}.json"

    def save(self, state_dir: Path) -> None:
        path = self.path_for(state_dir, Path(self.jobs_file))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"jobs_file": self.jobs_file, "broker": self.broker, "started": self.started,
                "finished": self.finished, "entries": [e.to_json() for e in self.entries]}
        write_json_atomic(path, data)

    @classmethod
    def load(cls, state_dir: Path, jobs_file: Path) -> RunRecord | None:
        path = cls.path_for(state_dir, jobs_file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UsageError(f"the record of the last run {str(path)!r} is damaged ({exc}); run without --resume.")\
                from None
        return cls(data["jobs_file"], data.get("broker"), tuple(Entry.from_json(e) for e in data["entries"]),
                   float(data.get("started") or 0), bool(data.get("finished")))


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    """Write JSON to ``path`` complete or not at all."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- progress ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """A job that is running now, for the display."""

    name: str
    worker: str
    seconds: float
    attempt: int


@dataclass(frozen=True)
class Snapshot:
    """How far a batch is: counts of its jobs and the ones running now."""

    total: int
    succeeded: int
    failed: int
    running: tuple[Running, ...] = ()
    note: str | None = None  # e.g. "waiting for workers"

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


ProgressCallback = Callable[[Snapshot], None]


def snapshot(entries: Sequence[Entry], jobs: dict[int, Job], note: str | None = None,
             worker_label: Callable[[Job], str] | None = None) -> Snapshot:
    """Count the entries by the state of their jobs (unsubmittable entries count as failed)."""
    succeeded = failed = 0
    running: list[Running] = []
    now = time.time()
    for entry in entries:
        job = jobs.get(entry.job_id) if entry.job_id is not None else None
        if entry.job_id is None or (job is not None and job.status == FAILED):
            failed += 1
        elif job is not None and job.status == SUCCEEDED:
            succeeded += 1
        elif job is not None and job.status == RUNNING:
            label = worker_label(job) if worker_label else (job.worker or "")
            running.append(Running(entry.name, label, now - (job.started_at or now), job.attempts))
    return Snapshot(len(entries), succeeded, failed, tuple(running), note)


# -- the local pool --------------------------------------------------------------------------------------


def worker_name(pid: int | None = None) -> str:
    """The name a local worker process has in the store: ``host/pid``."""
    return f"{HOST}/{pid if pid is not None else os.getpid()}"


def _pid_of(worker: str | None) -> int | None:
    if not worker:
        return None
    host, _, rest = worker.partition("/")
    pid = rest.split("/", 1)[0]
    if host != HOST or not pid.isdigit():
        return None
    return int(pid)


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a killed worker may linger as one until reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(store: JobStore, ids: Sequence[int], exclude: Collection[int] = ()) -> int:
    """Queue again the running jobs whose worker was a process on this machine that no longer exists
    (a run that crashed or was killed); returns how many. Jobs of other machines wait for their lease."""
    count = 0
    for job in store.jobs(ids):
        if job.status != RUNNING or job.worker is None:
            continue
        pid = _pid_of(job.worker)
        if pid is None or pid == os.getpid() or pid in exclude:
            continue
        if not _alive(pid) and store.release(job.id, job.worker):
            log.info("job %d: its worker %s is gone; queued again", job.id, job.worker)
            count += 1
    return count


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class _Heartbeat:
    """Renews a lease every ``interval`` seconds on its own thread until stopped."""

    def __init__(self, beat: Callable[[], Any], interval: float) -> None:
        self._beat = beat
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sconify-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._beat()
            except Exception as exc:  # a busy store: the next beat tries again
                log.warning("heartbeat failed: %s", exc)


@dataclass(frozen=True)
class PoolSettings:
    """What every local worker process needs to know."""

    store: str
    cache: str | None
    logs: str
    lease: float = LEASE_SECONDS
    max_attempts: int = MAX_ATTEMPTS


def log_path(logs: Path | str, job: Job) -> Path:
    name = str(job.spec.get("name") or "job")
    return Path(logs) / f"job-{job.id}-{name}.log"


def work_one(store: JobStore, job: Job, worker: str, cache: LayerCache | None, logs: Path, lease: float,
             max_attempts: int) -> None:
    """Run a claimed job and record its outcome; an interruption gives the job back to the queue."""
    spec = JobSpec.from_json(job.spec)
    path = log_path(logs, job)
    try:
        with _Heartbeat(lambda: store.heartbeat(job.id, worker), max(1.0, lease / 3)):
            result = run_job(spec, cache=cache, log_file=path)
    except (KeyboardInterrupt, SystemExit):
        store.release(job.id, worker)
        raise
    except NetworkError as exc:
        if job.attempts < max_attempts:
            delay = RETRY_BACKOFF[min(job.attempts - 1, len(RETRY_BACKOFF) - 1)]
            store.fail(job.id, exc.message, retry_at=time.time() + delay)
        else:
            store.fail(job.id, exc.message)
    except SconifyError as exc:
        store.fail(job.id, exc.message)
    except Exception as exc:
        store.fail(job.id, internal_error_text(exc, path))
    else:
        result.update(worker=worker, log=str(path), attempts=job.attempts)
        store.succeed(job.id, result)


def _worker_main(settings: PoolSettings, ids: list[int]) -> None:
    """A local worker process: claim jobs of this batch until none is left to claim, then exit."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM, after Ctrl-C
    logging.getLogger().addHandler(logging.NullHandler())
    from sconify.batch.sharing import SharedLayerCache

    store = JobStore(settings.store)
    cache = SharedLayerCache(Path(settings.cache)) if settings.cache else None
    worker = worker_name()
    while True:
        job = store.claim(worker, settings.lease, only=ids)
        if job is None:
            return
        work_one(store, job, worker, cache, Path(settings.logs), settings.lease, settings.max_attempts)


class LocalPool:
    """Runs the entries' jobs in up to ``jobs`` worker processes and reports progress until all are done."""

    def __init__(self, store: JobStore, entries: Sequence[Entry], settings: PoolSettings, jobs: int,
                 on_progress: ProgressCallback | None = None) -> None:
        if jobs < 1:
            raise UsageError(f"--jobs must be at least 1, not {jobs}.")
        self.store = store
        self.entries = list(entries)
        self.settings = settings
        self.jobs = jobs
        self.on_progress = on_progress
        self.ids = sorted({e.job_id for e in self.entries if e.job_id is not None})
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[Any] = []
        self._spawned: set[int] = set()  # every child's pid: their jobs are ours to judge, not recover_stale's

    def run(self) -> None:
        """Until every job is succeeded or failed; Ctrl-C stops the workers and queues their jobs again."""
        last_recovery = 0.0
        try:
            while True:
                if time.monotonic() - last_recovery > RECOVER_SECONDS:  # a dead run's worker may take a while
                    recover_stale(self.store, self.ids, self._spawned)  # to disappear; look again now and then
                    last_recovery = time.monotonic()
                jobs = {j.id: j for j in self.store.jobs(self.ids)}
                self._reap(jobs)
                jobs = {j.id: j for j in self.store.jobs(self.ids)}
                if self.on_progress:
                    self.on_progress(snapshot(self.entries, jobs))
                if all(j.finished for j in jobs.values()):
                    break
                self._spawn(jobs)
                time.sleep(POLL_SECONDS)
        except BaseException:
            self.stop()
            raise
        finally:
            self._join()

    def _claimable(self, jobs: dict[int, Job]) -> int:
        now = time.time()
        return sum(
            1 for j in jobs.values()
            if (j.status == QUEUED and (j.retry_at is None or j.retry_at <= now))
            or (j.status == RUNNING and (j.lease_until or 0) < now)
        )

    def _spawn(self, jobs: dict[int, Job]) -> None:
        alive = [c for c in self._children if c.is_alive()]
        busy = sum(1 for j in jobs.values() if j.status == RUNNING and _pid_of(j.worker) in {c.pid for c in alive})
        idle = len(alive) - busy  # children between jobs or about to claim
        wanted = min(self.jobs - len(alive), self._claimable(jobs) - idle)
        for _ in range(max(0, wanted)):
            child = self._ctx.Process(target=_worker_main, args=(self.settings, self.ids), daemon=False,
                                      name="sconify-batch-worker")
            child.start()
            self._children.append(child)
            if child.pid is not None:
                self._spawned.add(child.pid)

    def _reap(self, jobs: dict[int, Job]) -> None:
        """Forget exited children; queue again (or fail, after ``max_attempts``) a job whose worker died."""
        for child in [c for c in self._children if not c.is_alive()]:
            child.join()
            self._children.remove(child)
            worker = worker_name(child.pid)
            for job in jobs.values():
                if job.status != RUNNING or job.worker != worker:
                    continue
                how = _describe_exit(child.exitcode)
                if job.attempts >= self.settings.max_attempts:
                    self.store.fail(job.id, f"the worker process {how} on each of {job.attempts} attempts; see "
                                            f"{log_path(self.settings.logs, job)}")
                else:
                    self.store.fail(job.id, f"the worker process {how}", retry_at=time.time())

    def stop(self) -> None:
        """Stop the worker processes (they give their jobs back) and wait for them."""
        for child in self._children:
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in self._children:
            child.join(timeout=max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
        for child in self._children:  # a child killed before it could give its job back
            for job in self.store.jobs(self.ids):
                if job.status == RUNNING and job.worker == worker_name(child.pid):
                    self.store.release(job.id, job.worker)

    def _join(self) -> None:
        for child in self._children:
            child.join(timeout=STOP_GRACE)
        self._children = [c for c in self._children if c.is_alive()]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"died of {signal.Signals(-code).name}"
        except ValueError:
            return f"died of signal {-code}"
    return f"exited with code {code}"
