"""Distributed mode of the service: jobs accepted into the local store are run by ``sconify worker`` processes
on other machines, through the batch conversion's Celery app (Redis broker).

A dispatcher thread in the service claims each queued job from the store (with a lease it renews, so that a
restarted service takes over the jobs of a crashed one), resolves a tag to a digest, turns the job into the
batch ``JobSpec`` and sends it as a Celery task. When the outcome comes back it uploads the policy to the CAS
if one is configured and records success, or schedules a retry with backoff. Delivery is at least once; the
batch task keeps each result in Redis under the job's idempotency key, so a job sent twice (after a crash of
the service or of a worker) is converted and pushed once.

Key files, rule directories and the policy directory must be at the same paths on the service's machine and
on the workers' (shared storage); registry credentials reach the workers through their own docker config.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sconify.batch.store import JobStore
from sconify.errors import SconifyError
from sconify.image.reference import parse_reference
from sconify.service.config import ServiceConfig
from sconify.service.jobs import ServiceJob, policy_dir_for
from sconify.service.worker import PERMANENT, _describe, _private_dirs, resolve_digest

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
IN_FLIGHT = 64  # tasks sent and not yet answered, at most
# Exit codes of errors another attempt cannot cure (see sconify.errors): usage, reference, unsafe archive,
# unsupported, key material, conversion.
PERMANENT_CODES = frozenset({2, 3, 8, 9, 10, 11})


def batch_spec(job: ServiceJob, digest: str, config: ServiceConfig) -> Any:
    """The batch ``JobSpec`` that converts ``job``'s image, pinned to ``digest``."""
    from sconify.batch.jobs import JobSpec

    source = parse_reference(job.source).with_digest(digest)
    dest = parse_reference(job.destination)
    o = job.options
    env = o.get("env") or ()
    env_items = tuple(f"{k}={v}" for k, v in env.items()) if isinstance(env, dict) else tuple(env)
    command = o.get("command")
    if isinstance(command, str):
        import shlex

        command = tuple(shlex.split(command))

    def strings(name: str) -> tuple[str, ...]:
        value = o.get(name)
        return () if value is None else ((value,) if isinstance(value, str) else tuple(value))

    src_pull = config.sources[job.source_name].pull
    return JobSpec(
        name=f"{job.repository.replace('/', '-')}-{digest[7:19]}",
        source=str(source),
        destination=str(dest),
        policy_out=str(policy_dir_for(config.policy_dir, dest, digest)),
        encrypt=strings("encrypt"), authenticate=strings("authenticate"), plain=strings("plain"),
        rules=tuple(job.rules),
        heap=str(o["heap"]) if o.get("heap") is not None else None,
        stack=str(o["stack"]) if o.get("stack") is not None else None,
        threads=o.get("threads"), dlopen=o.get("dlopen"), allow_debug=bool(o.get("allow_debug", False)),
        layer_compression=o.get("layer_compression") or "auto",
        env=env_items, command=tuple(command) if command is not None else None,
        session=o.get("name"), namespace=o.get("namespace"), service=o.get("service"),
        **({"cas": o["cas"]} if o.get("cas") else {}), **({"las": o["las"]} if o.get("las") else {}),
        runtime=o.get("runtime"),
        fspf_key=job.fspf_key, enclave_key=job.enclave_key, sign_key=job.sign_key,
        secrets=job.secrets, inject=job.inject, platform=job.platform,
        src_authfile=src_pull.authfile, src_tls_verify=src_pull.tls_verify, src_cert_dir=src_pull.cert_dir,
        dest_authfile=config.destination.authfile, dest_tls_verify=config.destination.tls_verify,
        dest_cert_dir=config.destination.cert_dir,
        source_digest=digest,
        extra={"service_job": job.key()},
    )


class CeleryDispatcher:
    """Sends the store's queued jobs to Celery workers and records their outcomes (a thread of the service)."""

    def __init__(self, config: ServiceConfig) -> None:
        assert config.broker is not None
        self.config = config
        self.store = JobStore(config.store)
        self.me = f"{socket.gethostname()}:{os.getpid()}:dispatch"
        self.stopping = threading.Event()
        self._tasks: dict[int, tuple[Any, ServiceJob, str, int]] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sconify-dispatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        for job_id in list(self._tasks):  # the messages stay on the broker; the next service sends them again
            self.store.release(job_id, self.me)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        from sconify.batch.celery_app import check_broker, make_app

        while not self.stopping.is_set():
            try:
                check_broker(self.config.broker or "")
                app = make_app(self.config.broker or "")
                break
            except SconifyError as exc:
                log.warning("%s; trying again in 5 s", exc.message)
                self.stopping.wait(5)
        else:
            return
        last_beat = time.monotonic()
        while not self.stopping.is_set():
            try:
                sent = self._send(app)
                self._collect()
                if time.monotonic() - last_beat > self.config.lease_seconds / 4:
                    for job_id in list(self._tasks):
                        self.store.heartbeat(job_id, self.me)
                    last_beat = time.monotonic()
            except Exception as exc:  # the broker or the store hiccuped: keep going
                log.warning("dispatching failed (%s); trying again", exc)
                sent = False
                self.stopping.wait(1)
            if not sent:
                self.stopping.wait(POLL_SECONDS)

    def _send(self, app: Any) -> bool:
        from sconify.batch.celery_app import QUEUE, TASK_NAME
        from sconify.batch.jobs import job_key

        if len(self._tasks) >= IN_FLIGHT:
            return False
        job = self.store.claim(self.me, self.config.lease_seconds)
        if job is None:
            return False
        try:
            spec = ServiceJob.from_json(job.spec)
            source_cfg = self.config.sources[spec.source_name]
            digest = spec.digest or resolve_digest(spec.registry, spec.repository, spec.tag or "latest",
                                                   source_cfg.pull.transport())
            batch = batch_spec(spec, digest, self.config)
            _private_dirs(self.config.policy_dir, Path(batch.policy_out).parent)
            key = job_key(batch)
        except KeyError:
            self.store.fail(job.id, "the job's source is no longer in the service configuration.")
            return True
        except Exception as exc:
            self._failed(job.id, job.attempts, exc, None)
            return True
        result = app.send_task(TASK_NAME, args=[batch.to_json(), key], queue=QUEUE)
        self._tasks[job.id] = (result, spec, digest, job.attempts)
        log.info("job %s: sent %s to the workers", job.id, batch.source)
        return True

    def _collect(self) -> None:
        for job_id, (result, spec, digest, attempts) in list(self._tasks.items()):
            state = result.state
            if state not in ("SUCCESS", "FAILURE", "REVOKED"):
                continue
            outcome = result.result
            result.forget()
            del self._tasks[job_id]
            if state != "SUCCESS" or not isinstance(outcome, dict):
                self._failed(job_id, attempts, None, f"the task failed on the worker: {outcome!r}")
            elif outcome.get("status") == "succeeded":
                self._succeeded(job_id, attempts, spec, digest, outcome)
            else:
                code = int(outcome.get("exit_code") or 1)
                self._failed(job_id, attempts, None, str(outcome.get("error") or "failed on the worker"),
                             permanent=code in PERMANENT_CODES)

    def _succeeded(self, job_id: int, attempts: int, spec: ServiceJob, digest: str, outcome: dict[str, Any]
                   ) -> None:
        done = dict(outcome.get("result") or {})
        result: dict[str, Any] = {
            "source": spec.source if spec.digest else f"{spec.source}@{digest}",
            "source_digest": digest,
            "destination": done.get("destination"),
            "digest": done.get("digest"),
            "mrenclave": done.get("mrenclave"),
            "mrsigner": done.get("mrsigner"),
            "fspf_tag": done.get("fspf_tag"),
            "signature": done.get("signature"),
            "policy_dir": done.get("policy_dir"),
            "converted": not outcome.get("reused"),
            "worker": outcome.get("worker"),
        }
        policy_dir = done.get("policy_dir")
        if self.config.cas is not None and isinstance(policy_dir, str):
            from sconify.service.cas import upload_session

            try:
                result["cas"] = upload_session(self.config.cas, Path(policy_dir) / "session.yml")
            except SconifyError as exc:
                self._failed(job_id, attempts, exc, None)
                return
        self.store.succeed(job_id, result)
        log.info("job %s: %s -> %s", job_id, result["source"], result["destination"])

    def _failed(self, job_id: int, attempts: int, exc: BaseException | None, reason: str | None,
                permanent: bool = False) -> None:
        if exc is not None:
            reason = _describe(exc)
            permanent = isinstance(exc, PERMANENT)
        retry = self.config.retry
        if permanent or attempts >= retry.attempts:
            log.warning("job %s failed: %s", job_id, reason)
            self.store.fail(job_id, str(reason))
        else:
            delay = retry.delay(attempts)
            log.warning("job %s: attempt %d failed (%s); retrying in %.0f s", job_id, attempts, reason, delay)
            self.store.fail(job_id, str(reason), time.time() + delay)
