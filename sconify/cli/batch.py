"""``sconify batch`` (many conversions from a jobs file, locally or on Celery workers) and ``sconify worker``."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from sconify.cli.render import emit_json, emit_table

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)
STATE_DIR = ".sconify-batch"


class BatchDisplay:
    """One overall bar and one line per running job, on stderr (tqdm); plain progress lines without a tty."""

    def __init__(self, total: int, enabled: bool, live: bool) -> None:
        self.enabled = enabled
        self.live = live
        self._done = -1
        self._bar: Any = None
        self._lines: list[Any] = []
        if enabled and live:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._bar = tqdm(total=total, desc="batch", unit="job", position=0, file=sys.stderr, leave=True,
                             dynamic_ncols=True)

    def __call__(self, snap: Any) -> None:
        if not self.enabled:
            return
        if not self.live:
            if snap.done != self._done:
                self._done = snap.done
                failed = f", {snap.failed} failed" if snap.failed else ""
                click.echo(f"sconify: batch: {snap.done}/{snap.total} done{failed}", err=True)
            return
        self._bar.n = snap.done
        self._bar.set_postfix_str(f"{snap.succeeded} ok, {snap.failed} failed", refresh=False)
        self._bar.refresh()
        texts = [f"  {r.name}: running {r.seconds:.0f}s on {r.worker}" + (f" (attempt {r.attempt})" if r.attempt > 1
                                                                             else "") for r in snap.running]
        if snap.note:
            texts.append(f"  {snap.note}")
        while len(self._lines) < len(texts):
            self._lines.append(self._tqdm(total=0, bar_format="{desc}", position=len(self._lines) + 1, leave=False,
                                          file=sys.stderr, dynamic_ncols=True))
        for i, line in enumerate(self._lines):
            line.set_description_str(texts[i] if i < len(texts) else "", refresh=True)

    def close(self) -> None:
        for line in self._lines:
            line.close()
        if self._bar is not None:
            self._bar.close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.command()
@click.argument("jobs_file", metavar="JOBS.yaml", type=_FILE)
@click.option("--jobs", "-j", "parallel", type=click.IntRange(min=1), default=None,
              help="Conversions at a time on this machine (default: the number of CPUs).")
@click.option("--report", "report_path", type=_FILE,
              help="Write the JSON report here (default: reports/JOBS.json in the store's directory).")
@click.option("--resume", is_flag=True,
              help="Continue the last run of JOBS.yaml after a crash or Ctrl-C: the same jobs, finished ones kept.")
@click.option("--store", "store_path", type=_FILE,
              help=f"The SQLite job store (default: {STATE_DIR}/jobs.db beside JOBS.yaml); logs go beside it.")
@click.option("--cache", "cache_dir", type=_DIR, envvar="SCONIFY_CACHE", metavar="DIR",
              help="Layer cache shared by the jobs (default: $SCONIFY_CACHE, else cache/ beside the store).")
@click.option("--no-cache", is_flag=True, help="Do not share per-layer work between jobs (for comparison).")
@click.option("--broker", metavar="URL", envvar="SCONIFY_BROKER",
              help="Run the jobs on Celery workers through this Redis broker (default: the jobs file's 'broker').")
@click.option("--force", is_flag=True, help="Run every job again, also those done before with the same key.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the summary table.")
@click.pass_context
def batch(ctx: click.Context, jobs_file: Path, parallel: int | None, report_path: Path | None, resume: bool,
          store_path: Path | None, cache_dir: Path | None, no_cache: bool, broker: str | None, force: bool,
          as_json: bool) -> None:
    """Convert every image listed in JOBS.yaml, several at a time; jobs done before are not redone.

    Exit code 0 when every job succeeded, 14 when some failed (the report names each error), 130 when
    interrupted (continue with --resume).

    \b
    Example:
      sconify batch catalogue.yaml --jobs 4 --report out/report.json
      sconify batch catalogue.yaml --broker redis://queue:6379/0   # with `sconify worker` on each machine
    """
    from sconify.batch.jobs import load_jobs
    from sconify.batch.report import (
        TABLE_HEADERS,
        BatchFailed,
        BatchInterrupted,
        collect,
        report_data,
        table_rows,
    )
    from sconify.batch.runner import LocalPool, PoolSettings, RunRecord, submit_all, write_json_atomic
    from sconify.batch.store import JobStore
    from sconify.errors import UsageError

    jobs_file = jobs_file.absolute()
    store_path = (store_path or jobs_file.parent / STATE_DIR / "jobs.db").absolute()
    state_dir = store_path.parent
    store = JobStore(store_path)
    cache = None if no_cache else str((cache_dir or state_dir / "cache").absolute())
    logs = state_dir / "logs"
    report_path = (report_path or state_dir / "reports" / f"{jobs_file.stem}.json").absolute()
    started = time.time()

    if resume:
        record = RunRecord.load(state_dir, jobs_file)
        if record is None:
            raise UsageError(f"there is no earlier run of {jobs_file} to resume in {state_dir}; run it without "
                             "--resume.")
        entries = list(record.entries)
        broker = broker or record.broker
    else:
        parsed = load_jobs(jobs_file)
        broker = broker or parsed.broker
        entries = submit_all(store, parsed.specs, force=force)
        record = RunRecord(str(jobs_file), broker, tuple(entries), started)
        record.save(state_dir)

    quiet = bool((ctx.find_root().obj or {}).get("quiet"))
    display = BatchDisplay(len(entries), enabled=not quiet, live=sys.stderr.isatty())
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    try:
        if broker:
            from sconify.batch.celery_app import DistributedRunner

            DistributedRunner(store, entries, broker, on_progress=display).run()
        else:
            logs.mkdir(parents=True, exist_ok=True, mode=0o700)
            settings = PoolSettings(store=str(store_path), cache=cache, logs=str(logs))
            LocalPool(store, entries, settings, parallel or os.cpu_count() or 1, on_progress=display).run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        display.close()

    outcomes = collect(store, entries)
    data = report_data(outcomes, jobs_file=str(jobs_file), store=str(store_path), cache=None if broker else cache,
                       broker=broker, started=started)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_path, data)
    unfinished = sum(1 for o in outcomes if o.status == "unfinished")
    if not interrupted and unfinished == 0:
        RunRecord(record.jobs_file, broker, record.entries, record.started, finished=True).save(state_dir)

    if as_json:
        emit_json(data)
    else:
        emit_table(TABLE_HEADERS, table_rows(outcomes))
    if not quiet:
        counts = data["counts"]
        where = f"in {logs}" if not broker else "on the workers (see the report)"
        click.echo(f"sconify: {counts['succeeded']} succeeded ({counts['done_before']} done before), "
                   f"{counts['failed']} failed, {unfinished} unfinished in {data['seconds']:.1f}s; "
                   f"report {report_path}; logs {where}", err=True)
    if interrupted:
        raise BatchInterrupted(
            f"the batch was interrupted with {unfinished} of {len(outcomes)} jobs unfinished; continue it with "
            f"`sconify batch {jobs_file} --resume` (finished jobs are kept)."
        )
    failed = data["counts"]["failed"] + unfinished
    if failed:
        raise BatchFailed(
            f"{failed} of {len(outcomes)} jobs failed; the report {report_path} gives each error. Fix them and run "
            "the batch again: jobs that succeeded are not redone."
        )


def _default_dir(env: str, fallback: str, *parts: str) -> Path:
    base = os.environ.get(env) or os.path.expanduser(fallback)
    return Path(base, *parts)


@click.command()
@click.option("--broker", required=True, metavar="URL", envvar="SCONIFY_BROKER",
              help="The Redis broker the batch clients send jobs to (redis://HOST:PORT/DB).")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=None,
              help="Jobs at a time on this machine (default: the number of CPUs).")
@click.option("--cache", "cache_dir", type=_DIR, envvar="SCONIFY_CACHE", metavar="DIR",
              help="This machine's layer cache (default: $SCONIFY_CACHE, else ~/.cache/sconify/layers).")
@click.option("--log-dir", type=_DIR, metavar="DIR", help="Per-job logs (default: ~/.local/state/sconify/worker-logs).")
@click.option("--name", help="The worker's node name (default: sconify-PID@HOST).")
@click.option("--visibility-timeout", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Seconds after which a job that no worker acknowledged is delivered again (longer than "
                   "your longest conversion).")
@click.option("--lease", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds a running job stays locked after its worker stops renewing the lock (it died).")
@click.pass_context
def worker(ctx: click.Context, broker: str, concurrency: int | None, cache_dir: Path | None, log_dir: Path | None,
           name: str | None, visibility_timeout: float, lease: float) -> None:
    """Run batch jobs sent through BROKER on this machine until stopped (Ctrl-C or SIGTERM finish running jobs).

    \b
    Example:
      sconify worker --broker redis://queue.example:6379/0 --concurrency 4
    """
    from sconify.batch.celery_app import run_worker

    verbose = int((ctx.find_root().obj or {}).get("verbose") or 0)
    cache = cache_dir or _default_dir("XDG_CACHE_HOME", "~/.cache", "sconify", "layers")
    logs = log_dir or _default_dir("XDG_STATE_HOME", "~/.local/state", "sconify", "worker-logs")
    code = run_worker(
        broker,
        concurrency=concurrency or os.cpu_count() or 1,
        cache=str(cache.absolute()),
        logs=str(logs.absolute()),
        name=name,
        visibility_timeout=visibility_timeout,
        lease=lease,
        loglevel="DEBUG" if verbose >= 2 else "INFO" if verbose else "WARNING",
    )
    if code:
        ctx.exit(code)
