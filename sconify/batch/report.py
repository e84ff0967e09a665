"""The outcome of a batch: one record per job (with its error), the JSON report, the summary table's rows, and the
errors that give ``sconify batch`` its exit code."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sconify import __version__
from sconify.batch.runner import Entry
from sconify.batch.store import FAILED, SUCCEEDED, JobStore
from sconify.errors import SconifyError

REPORT_FORMAT = 1
UNFINISHED = "unfinished"


class BatchFailed(SconifyError):
    """Some jobs of a batch failed (the others ran to the end); the report lists each with its error."""

    exit_code = 14


class BatchInterrupted(SconifyError):
    """A batch was stopped (Ctrl-C or SIGTERM) before every job finished; ``--resume`` continues it."""

    exit_code = 130


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job of a batch."""

    name: str
    status: str  # succeeded, failed, unfinished
    source: str
    destination: str
    policy_dir: str | None
    job_id: int | None = None
    key: str | None = None
    done_before: bool = False
    source_digest: str | None = None
    digest: str | None = None
    mrenclave: str | None = None
    mrsigner: str | None = None
    fspf_tag: str | None = None
    signature: str | None = None
    seconds: float | None = None
    attempts: int = 0
    error: str | None = None
    log: str | None = None
    worker: str | None = None
    layers: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @property
    def layers_from_cache(self) -> int:
        return sum(1 for layer in self.layers if layer.get("action") == "cached")

    @property
    def layers_built(self) -> int:
        return len(self.layers) - self.layers_from_cache


def collect(store: JobStore, entries: Sequence[Entry]) -> list[JobOutcome]:
    """One outcome per entry, from the store's view of its job."""
    jobs = {j.id: j for j in store.jobs([e.job_id for e in entries if e.job_id is not None])}
    out = []
    for entry in entries:
        spec = entry.spec
        base = {"name": entry.name, "source": spec.get("source", ""), "destination": spec.get("destination", ""),
                "policy_dir": spec.get("policy_out"), "job_id": entry.job_id, "key": entry.key,
                "source_digest": spec.get("source_digest")}
        job = jobs.get(entry.job_id) if entry.job_id is not None else None
        if job is None:
            out.append(JobOutcome(status=FAILED, error=entry.error or "the job is missing from the store", **base))
            continue
        result = job.result or {}
        seconds = result.get("seconds")
        if seconds is None and job.started_at and job.finished_at:
            seconds = round(job.finished_at - job.started_at, 3)
        status = job.status if job.status in (SUCCEEDED, FAILED) else UNFINISHED
        out.append(JobOutcome(
            **{**base, "source_digest": result.get("source_digest") or base["source_digest"]},
            status=status,
            done_before=entry.done_before,
            digest=result.get("digest"),
            mrenclave=result.get("mrenclave"),
            mrsigner=result.get("mrsigner"),
            fspf_tag=result.get("fspf_tag"),
            signature=result.get("signature"),
            seconds=seconds,
            attempts=job.attempts,
            error=None if status == SUCCEEDED else (job.error or ("not run yet" if status == UNFINISHED else None)),
            log=result.get("log"),
            worker=result.get("worker") or job.worker,
            layers=tuple(result.get("layers") or ()),
        ))
    return out


def report_data(outcomes: Sequence[JobOutcome], *, jobs_file: str, store: str, cache: str | None,
                broker: str | None, started: float, finished: float | None = None) -> dict[str, Any]:
    """The JSON report: the run's settings, counts and every job with its result or error."""
    finished = time.time() if finished is None else finished
    counts = {SUCCEEDED: 0, FAILED: 0, UNFINISHED: 0}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    return {
        "format": REPORT_FORMAT,
        "sconify_version": __version__,
        "jobs_file": jobs_file,
        "store": store,
        "cache": cache,
        "broker": _redact(broker),
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round(finished - started, 3),
        "counts": {**counts, "total": len(outcomes), "done_before": sum(1 for o in outcomes if o.done_before)},
        "layers": {"built": sum(o.layers_built for o in outcomes if not o.done_before),
                   "from_cache": sum(o.layers_from_cache for o in outcomes if not o.done_before)},
        "jobs": [o.to_json() for o in outcomes],
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _redact(url: str | None) -> str | None:
    """A broker URL without its password."""
    if not url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if user else ':***'}@{host}"


def short_digest(digest: str | None, hex_digits: int = 12) -> str:
    if not digest:
        return "-"
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:hex_digits]}" if hexpart else digest[:hex_digits]


TABLE_HEADERS = ("job", "source digest", "output digest", "mrenclave", "time", "status")


def table_rows(outcomes: Sequence[JobOutcome]) -> list[tuple[str, ...]]:
    """The summary table: job, source digest, output digest, MRENCLAVE, time, status."""
    rows: list[tuple[str, ...]] = []
    for o in outcomes:
        status = o.status
        if o.done_before and o.status == SUCCEEDED:
            status = "done before"
        elif o.status == FAILED and o.error:
            status = f"failed: {_one_line(o.error)}"
        seconds = "-" if o.seconds is None or o.done_before else f"{o.seconds:.1f}s"
        rows.append((o.name, short_digest(o.source_digest), short_digest(o.digest),
                     (o.mrenclave or "-")[:16], seconds, status))
    return rows


def _one_line(text: str, limit: int = 100) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
