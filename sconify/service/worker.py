"""The conversion side of the service: worker processes that claim jobs from the durable store, convert, and
record the outcome, with retries and exponential backoff.

A job is idempotent, so that a worker that dies (SIGKILL, power loss) after pushing but before recording
success does not push twice when its job runs again: before converting, the worker looks at the destination,
and when the tag already names a conversion of the same source image (the manifest's
``org.opencontainers.image.base.digest`` annotation) whose policy directory holds the matching report, the job
only completes what may be missing (the signature, the CAS upload) and succeeds without a new push.

Workers run in their own processes (``multiprocessing`` spawn), so the HTTP event loop never waits for CPU
work; each holds a lease on its job and renews it from a heartbeat thread. A worker dies with the service
(``PR_SET_PDEATHSIG``), and a job whose worker died is taken again when its lease runs out.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sconify.errors import (
    BadReferenceError,
    ConversionError,
    KeyMaterialError,
    NotFoundError,
    SconifyError,
    UnsafeArchiveError,
    UnsupportedError,
    UsageError,
)
from sconify.image.model import Platform, sha256_digest
from sconify.image.reference import DOCKER, OCI, Reference, parse_reference
from sconify.image.transports import TransportOptions, open_destination, open_image
from sconify.plan import ConvertOptions, options_from_flags
from sconify.secretfile import make_private_dir
from sconify.service.config import ServiceConfig
from sconify.service.jobs import ServiceJob, policy_dir_for

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often an idle worker looks for a job
WORKER_NICE = 10  # conversions yield the CPU to the service process, which answers registries
BASE_ANNOTATION = "org.opencontainers.image.base.digest"
# Errors that another attempt cannot cure: the job fails at once with the reason.
PERMANENT = (UsageError, BadReferenceError, UnsupportedError, ConversionError, KeyMaterialError, UnsafeArchiveError)


class _Stop(BaseException):
    """Raised in a worker's main thread to abandon the current job (service stopping, lease lost)."""


def convert_options(options: dict[str, Any]) -> ConvertOptions:
    """A route's ``options`` (the names of ``sconify convert``'s flags; ``name`` is the session) as options."""
    flags = {k.replace("-", "_"): v for k, v in options.items()}
    flags.setdefault("session", flags.get("name"))
    return options_from_flags(flags)


def resolve_digest(registry: str, repository: str, tag: str, transport: TransportOptions) -> str:
    """The digest a tag names right now (of the index, for a multi-platform image)."""
    from sconify.image.transports.registry import RegistryClient

    client = RegistryClient(registry, repository, transport)
    data, _media_type, _announced = client.read_manifest(tag, f"docker://{registry}/{repository}:{tag}")
    return sha256_digest(data)


@dataclass(frozen=True)
class Outcome:
    """What one job run produced (the job's result in the store)."""

    result: dict[str, Any]


def _done_before(dest: Reference, source_digest: str, policy_out: Path, transport: TransportOptions,
                 platform: Platform | None) -> dict[str, Any] | None:
    """The report of an earlier run of this very conversion, when its image is at the destination."""
    report_file = policy_out / "report.json"
    if not report_file.is_file():
        return None
    try:
        report = json.loads(report_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:
        image = open_image(dest, platform, transport)
    except NotFoundError:
        return None
    except SconifyError as exc:
        log.info("cannot read the destination %s (%s); converting", dest, exc)
        return None
    annotations = image.manifest.get("annotations") or {}
    if annotations.get(BASE_ANNOTATION) != source_digest or report.get("digest") != image.digest:
        return None
    return dict(report)


def _has_signature(dest: Reference, digest: str, transport: TransportOptions) -> bool:
    from sconify.signing.cosign import signature_tag

    if dest.transport == DOCKER:
        from sconify.image.transports.registry import RegistryClient

        assert dest.registry and dest.repository
        client = RegistryClient(dest.registry, dest.repository, transport)
        try:
            client.read_manifest(signature_tag(digest), "the signature")
        except NotFoundError:
            return False
        return True
    try:
        open_image(Reference(OCI, path=dest.path, tag=signature_tag(digest)), None, transport)
    except SconifyError:
        return False
    return True


def _sign(dest: Reference, digest: str, key_file: Path, transport: TransportOptions) -> str | None:
    """Sign ``digest`` at ``dest`` in cosign's format unless a signature is there already."""
    from sconify.signing.cosign import sign, signature_manifest, signature_tag, simple_signing_payload, write_signature
    from sconify.signing.keys import load_signing_key

    if dest.transport not in (DOCKER, OCI):
        return None
    sig_ref = Reference(dest.transport, registry=dest.registry, repository=dest.repository,
                        tag=signature_tag(digest), path=dest.path)
    if _has_signature(dest, digest, transport):
        return str(sig_ref)
    key = load_signing_key(key_file)
    payload = simple_signing_payload(dest.name or str(dest.path), digest)
    return write_signature(open_destination(sig_ref, transport), signature_manifest(payload, sign(key, payload)))


def run_job(job: ServiceJob, config: ServiceConfig) -> dict[str, Any]:
    """Convert one pushed image (or find it converted already) and return the job's result."""
    from sconify.build.cache import LayerCache
    from sconify.convert import convert

    started = time.monotonic()
    source_cfg = config.sources.get(job.source_name)
    if source_cfg is None:
        raise UsageError(f"the job's source {job.source_name!r} is no longer in the service configuration.")
    pull = source_cfg.pull.transport()
    push = config.destination.transport()
    platform = Platform.parse(job.platform) if job.platform else None
    digest = job.digest
    if digest is None:
        assert job.tag is not None
        digest = resolve_digest(job.registry, job.repository, job.tag, pull)
        log.info("job for %s: tag %s is %s", job.repository, job.tag, digest)
    source = Reference(DOCKER, registry=job.registry, repository=job.repository, tag=job.tag, digest=digest)
    dest = parse_reference(job.destination)
    image = open_image(source, platform, pull)
    policy_out = policy_dir_for(config.policy_dir, dest, digest)
    _private_dirs(config.policy_dir, policy_out.parent)
    result: dict[str, Any] = {"source": str(source), "source_digest": digest, "image_digest": image.digest,
                              "policy_dir": str(policy_out)}
    report = _done_before(dest, image.digest, policy_out, push, platform)
    if report is not None:
        log.info("%s was converted to %s before; not pushing again", source, dest)
        result.update(converted=False, destination=report.get("destination"), digest=report["digest"],
                      mrenclave=report.get("mrenclave"), mrsigner=report.get("mrsigner"),
                      fspf_tag=report.get("fspf_tag"))
        signature = _sign(dest, report["digest"], Path(job.sign_key), push) if job.sign_key else None
        result["signature"] = signature
    else:
        converted = convert(
            source,
            dest,
            convert_options(job.options),
            policy_out=policy_out,
            fspf_key_file=Path(job.fspf_key) if job.fspf_key else None,
            enclave_key_file=Path(job.enclave_key) if job.enclave_key else None,
            sign_key_file=Path(job.sign_key) if job.sign_key else None,
            secrets_file=Path(job.secrets) if job.secrets else None,
            inject_file=Path(job.inject) if job.inject else None,
            platform=platform,
            src_transport=pull,
            dest_transport=push,
            rules_dirs=[Path(r) for r in job.rules],
            cache=LayerCache(config.cache_dir) if config.cache_dir else None,
        )
        result.update(converted=True, destination=converted.destination, digest=converted.digest,
                      mrenclave=converted.mrenclave, mrsigner=converted.mrsigner, fspf_tag=converted.fspf_tag,
                      signature=converted.signature)
    if config.cas is not None:
        from sconify.service.cas import upload_session

        result["cas"] = upload_session(config.cas, policy_out / "session.yml")
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _private_dirs(root: Path, path: Path) -> None:
    """Create ``path`` below ``root`` with every directory on the way 0700 (policies hold keys)."""
    make_private_dir(root)
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if not current.is_dir():
            make_private_dir(current)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SconifyError):
        return exc.message
    return f"internal error: {type(exc).__name__}: {exc}"


class Worker:
    """One worker: claims jobs from the store and runs them until told to stop."""

    def __init__(self, config: ServiceConfig, name: str | None = None) -> None:
        from sconify.batch.store import JobStore

        self.config = config
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.store = JobStore(config.store)
        self.stopping = threading.Event()
        self._busy = threading.Event()
        self._lost = threading.Event()

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        period = max(0.2, self.config.lease_seconds / 4)
        while not done.wait(period):
            try:
                if not self.store.heartbeat(job_id, self.name):
                    log.warning("job %s: the lease was lost; abandoning it", job_id)
                    self._lost.set()
                    _interrupt_main()
                    return
            except Exception as exc:  # a busy store must not kill the conversion; the next beat tries again
                log.warning("job %s: heartbeat failed (%s)", job_id, exc)

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        from sconify.batch.store import Job

        job: Job | None = self.store.claim(self.name, self.config.lease_seconds)
        if job is None:
            return False
        try:
            spec = ServiceJob.from_json(job.spec)
        except (ValueError, TypeError) as exc:
            self.store.fail(job.id, f"the job is not a service conversion ({exc}).")
            return True
        log.info("job %s: converting %s to %s (attempt %d)", job.id, spec.source, spec.destination, job.attempts)
        done = threading.Event()
        self._lost.clear()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, done), daemon=True)
        self._busy.set()
        beat.start()
        try:
            result = run_job(spec, self.config)
        except _Stop:
            done.set()
            if not self._lost.is_set():
                self.store.release(job.id, self.name)
                log.info("job %s: stopped and given back to the queue", job.id)
            raise
        except Exception as exc:
            done.set()
            self._busy.clear()
            self._failed(job, exc)
            return True
        finally:
            done.set()
            self._busy.clear()
        self.store.succeed(job.id, result)
        log.info("job %s: %s -> %s (%s)", job.id, spec.source, result.get("destination"),
                 "converted" if result.get("converted") else "found converted")
        return True

    def _failed(self, job: Any, exc: BaseException) -> None:
        reason = _describe(exc)
        if not isinstance(exc, SconifyError):
            log.error("job %s: %s\n%s", job.id, reason, "".join(traceback.format_exception(exc)))
        retry = self.config.retry
        if isinstance(exc, PERMANENT) or job.attempts >= retry.attempts:
            why = "" if isinstance(exc, PERMANENT) else f" (after {job.attempts} attempts)"
            log.warning("job %s failed%s: %s", job.id, why, reason)
            self.store.fail(job.id, reason + why)
        else:
            delay = retry.delay(job.attempts)
            log.warning("job %s: attempt %d failed (%s); retrying in %.0f s", job.id, job.attempts, reason, delay)
            self.store.fail(job.id, reason, time.time() + delay)

    def _nothing_to_claim(self) -> bool:
        """A read-only look at the store: no queued job and none running (whose lease might run out).

        Idle workers look this way instead of trying to claim, which takes the store's write lock, so that they
        do not slow down the service's inserts of new jobs.
        """
        try:
            counts = self.store.counts()
        except Exception:
            return False
        return counts.get("queued", 0) == 0 and counts.get("running", 0) == 0

    def run(self) -> None:
        """Run jobs until ``stopping`` is set (or SIGTERM in a worker process)."""
        while not self.stopping.is_set():
            try:
                if self._nothing_to_claim() or not self.run_once():
                    self.stopping.wait(POLL_SECONDS)
            except _Stop:
                if self._lost.is_set() and not self.stopping.is_set():
                    continue
                break


def _interrupt_main() -> None:
    """Make the main thread raise _Stop at its next bytecode (the conversion unwinds and cleans up)."""
    main = threading.main_thread().ident
    if main is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main), ctypes.py_object(_Stop))


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(config: ServiceConfig, index: int, parent: int, log_level: int = logging.INFO,
                nice: int = WORKER_NICE) -> None:
    """Entry point of a worker process started by the service."""
    _die_with_parent()
    if os.getppid() != parent:  # the service died before prctl took effect
        os._exit(1)
    logging.basicConfig(level=log_level, format=f"sconify worker {index}: %(levelname)s: %(message)s")
    if nice:
        try:
            os.nice(nice)  # event acceptance in the service process comes first
        except OSError:
            pass
    worker = Worker(config)

    def on_term(_signum: int, _frame: Any) -> None:
        worker.stopping.set()
        if worker._busy.is_set():
            raise _Stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the service decides
    worker.run()
