"""The HTTP side of the service (aiohttp): event endpoints that only authenticate, validate, route and enqueue,
plus ``/jobs``, ``/healthz`` and ``/metrics``; and ``serve``, which runs it beside the worker processes.

Endpoints:

``POST /events/{source}``            distribution, Harbor and GitHub sources (credential in a header)
``POST /events/{source}/{secret}``   Docker Hub sources (credential in the URL)
``GET /jobs[?status=S&limit=N]``, ``GET /jobs/{id}``, ``GET /healthz``, ``GET /metrics``

A push is answered 202 only after its job is committed to the durable store (a store that cannot be written
gives 503, so the sender delivers again). Store calls run on a dedicated thread, so that the event loop only
parses and answers.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from sconify import __version__
from sconify.batch.store import FAILED, SUCCEEDED, JobStore
from sconify.errors import SconifyError, UsageError
from sconify.secretfile import make_private_dir
from sconify.service import auth
from sconify.service.config import ServiceConfig
from sconify.service.events import Delivery, EventError, parse
from sconify.service.jobs import make_job
from sconify.service.metrics import CONTENT_TYPE, Metrics
from sconify.service.routes import Router

log = logging.getLogger("sconify.service")

MAX_LIST = 1000


class _AccessLogger(AbstractAccessLogger):
    """One line per request, with the URL secret of Docker Hub sources blanked out."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = re.sub(r"^(/events/[^/]+/)[^/?]+", r"\1***", request.path)
        self.logger.info("%s %s %s %d %.1f ms", request.remote, request.method, path, response.status, time * 1000)


class ServiceState:
    """What the handlers share: config, router, store, metrics, the store thread, the worker processes."""

    def __init__(self, config: ServiceConfig, store: JobStore) -> None:
        self.config = config
        self.router = Router(config)
        self.store = store
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-write")
        self.reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read")
        self.metrics = Metrics(store.counts, self._durations)
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self.dispatcher: Any = None  # CeleryDispatcher when a broker is configured
        self.started = time.time()

    def _durations(self, seen: set[str]) -> Iterable[tuple[str, str, float]]:
        for status in (SUCCEEDED, FAILED):
            for job in self.store.list(status):
                key = str(job.id)
                if key in seen or job.started_at is None or job.finished_at is None:
                    continue
                yield key, status, max(0.0, job.finished_at - job.started_at)

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.reader.shutdown(wait=False)


STATE_KEY = web.AppKey("state", ServiceState)


def _json_error(status: int, reason: str, **extra: Any) -> web.Response:
    return web.json_response({"error": reason, **extra}, status=status)


async def _event(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    started = time.perf_counter()
    name = request.match_info["source"]
    source = state.config.sources.get(name)
    if source is None:
        state.metrics.rejected.labels("unknown", "unknown-source").inc()
        return _json_error(404, f"no event source called {name!r} is configured.")
    try:
        return await _handle_event(request, state, source)
    finally:
        state.metrics.latency.labels(name).observe(time.perf_counter() - started)


async def _handle_event(request: web.Request, state: ServiceState, source: Any) -> web.Response:
    metrics = state.metrics
    metrics.received.labels(source.name).inc()
    remote = request.remote or "?"
    problem = auth.check_url_secret(source, request.match_info.get("secret")) or auth.check_header(
        source, request.headers)
    if problem:
        log.warning("refused an event for source %s from %s: %s", source.name, remote, problem)
        metrics.rejected.labels(source.name, "unauthenticated").inc()
        return _json_error(401, f"authentication failed: {problem}.")
    limit = state.config.max_body
    if request.content_length is not None and request.content_length > limit:
        metrics.rejected.labels(source.name, "too-large").inc()
        return _json_error(413, f"the body of {request.content_length} bytes is larger than the limit of {limit}.")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.rejected.labels(source.name, "too-large").inc()
        return _json_error(413, f"the body is larger than the limit of {limit} bytes.")
    problem = auth.check_body(source, request.headers, body)
    if problem:
        log.warning("refused an event for source %s from %s: %s", source.name, remote, problem)
        metrics.rejected.labels(source.name, "unauthenticated").inc()
        return _json_error(401, f"authentication failed: {problem}.")
    try:
        delivery: Delivery = parse(source.kind, body, request.headers)
    except EventError as exc:
        label = {400: "malformed", 413: "too-large", 415: "unsupported-media-type"}.get(exc.status, str(exc.status))
        metrics.rejected.labels(source.name, label).inc()
        log.info("refused an event for source %s from %s: %s", source.name, remote, exc.reason)
        return _json_error(exc.status, exc.reason)
    if delivery.pong:
        return web.json_response({"pong": True, "service": f"sconify {__version__}"})

    ignored: list[dict[str, Any]] = [{"event": s.what, "reason": s.reason} for s in delivery.skipped]
    invalid: list[dict[str, Any]] = [{"event": s.what, "reason": s.reason} for s in delivery.invalid]
    for _ in delivery.skipped:
        metrics.ignored.labels(source.name, "not-a-push").inc()
    for _ in delivery.invalid:
        metrics.rejected.labels(source.name, "invalid-event").inc()
    jobs, meta = [], []
    for push in delivery.pushes:
        decision = state.router.decide(source.name, source.registry, push.repository, push.tag, push.digest)
        if decision.route is None:
            metrics.ignored.labels(source.name, _reason_label(decision.reason)).inc()
            ignored.append({"repository": push.repository, "tag": push.tag, "digest": push.digest,
                            "reason": decision.reason})
            continue
        try:
            job = make_job(source, push, decision.route, decision.captures)
        except SconifyError as exc:
            metrics.rejected.labels(source.name, "invalid-event").inc()
            invalid.append({"repository": push.repository, "tag": push.tag, "reason": exc.message})
            continue
        jobs.append(job)
        meta.append(push)
    if not jobs and invalid:
        return _json_error(400, "no valid push in the request: " + "; ".join(i["reason"] for i in invalid) + ".",
                           invalid=invalid, ignored=ignored)
    accepted = []
    if jobs:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(
                state.writer, lambda: [state.store.submit(j.to_json(), j.key()) for j in jobs])
        except Exception as exc:  # the sender must deliver again: nothing may be lost
            log.error("cannot record jobs in the store %s: %s", state.config.store, exc)
            metrics.rejected.labels(source.name, "store-unavailable").inc()
            return _json_error(503, "the job store cannot be written right now; deliver the event again.")
        for job, push, (job_id, created) in zip(jobs, meta, outcomes, strict=True):
            (metrics.queued if created else metrics.duplicates).labels(source.name).inc()
            accepted.append({"job": job_id, "created": created, "repository": push.repository, "tag": push.tag,
                             "digest": push.digest, "destination": job.destination})
            if created:
                log.info("job %s: %s from %s -> %s", job_id, push.digest or push.tag, push.repository,
                         job.destination)
    body_out: dict[str, Any] = {"accepted": accepted, "ignored": ignored}
    if invalid:
        body_out["invalid"] = invalid
    return web.json_response(body_out, status=202)


def _reason_label(reason: str) -> str:
    if "own push" in reason:
        return "own-push"
    if "no route" in reason:
        return "unrouted"
    if "digest only" in reason:
        return "untagged"
    if "signature" in reason:
        return "signature"
    return "other"


def job_json(job: Any) -> dict[str, Any]:
    """A job as the API shows it."""
    spec = job.spec or {}
    return {
        "id": job.id,
        "status": job.status,
        "attempts": job.attempts,
        "source": _source_of(spec),
        "destination": spec.get("destination"),
        "route": spec.get("route"),
        "error": job.error,
        "result": job.result,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "retry_at": job.retry_at,
        "worker": job.worker,
    }


def _source_of(spec: dict[str, Any]) -> str | None:
    if not spec.get("repository"):
        return spec.get("source")
    out = f"docker://{spec.get('registry')}/{spec['repository']}"
    if spec.get("tag"):
        out += f":{spec['tag']}"
    if spec.get("digest"):
        out += f"@{spec['digest']}"
    return out


def _api_refused(request: web.Request, state: ServiceState) -> web.Response | None:
    """With ``api_token`` configured, the job API wants it as a Bearer token (the jobs name images and paths)."""
    token = state.config.api_token
    if token is None:
        return None
    given = request.headers.get("Authorization", "")
    if auth.equal(f"Bearer {token}", given):
        return None
    log.warning("refused a request for %s from %s: %s", request.path, request.remote,
                "no API token" if not given else "wrong API token")
    return _json_error(401, "the job API needs the service's API token (Authorization: Bearer TOKEN).")


async def _jobs(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if (refused := _api_refused(request, state)) is not None:
        return refused
    status = request.query.get("status")
    if status is not None and status not in ("queued", "running", "succeeded", "failed"):
        return _json_error(400, f"status {status!r} is not one of queued, running, succeeded, failed.")
    try:
        limit = int(request.query.get("limit", MAX_LIST))
    except ValueError:
        return _json_error(400, "limit must be a whole number.")
    limit = max(1, min(limit, MAX_LIST))
    loop = asyncio.get_running_loop()
    jobs = await loop.run_in_executor(state.reader, state.store.list, status)
    counts = await loop.run_in_executor(state.reader, state.store.counts)
    newest = jobs[-limit:][::-1]
    return web.json_response({"counts": counts, "jobs": [job_json(j) for j in newest]})


async def _job(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if (refused := _api_refused(request, state)) is not None:
        return refused
    text = request.match_info["id"]
    if not text.isdigit():
        return _json_error(400, f"job id {text!r} is not a number.")
    job = await asyncio.get_running_loop().run_in_executor(state.reader, state.store.get, int(text))
    if job is None:
        return _json_error(404, f"there is no job {text}.")
    return web.json_response(job_json(job))


async def _healthz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        counts = await asyncio.get_running_loop().run_in_executor(state.reader, state.store.counts)
    except Exception as exc:
        return web.json_response({"status": "unhealthy", "store": str(exc)}, status=503)
    alive = sum(1 for p in state.workers if p.is_alive())
    body: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "uptime": round(time.time() - state.started, 1),
        "jobs": counts,
    }
    if state.config.broker:
        body["dispatcher"] = {"broker": _redact_url(state.config.broker),
                              "alive": bool(state.dispatcher and state.dispatcher.alive())}
    else:
        body["workers"] = {"configured": state.config.workers, "alive": alive}
    return web.json_response(body)


def _redact_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await asyncio.get_running_loop().run_in_executor(state.reader, state.metrics.render)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})


async def _too_large(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        return _json_error(413, exc.text or "the body is too large.")


def make_app(config: ServiceConfig, store: JobStore | None = None) -> web.Application:
    """The aiohttp application (without workers; ``serve`` adds them)."""
    make_private_dir(config.state_dir)
    store = store or JobStore(config.store)
    state = ServiceState(config, store)
    app = web.Application(client_max_size=config.max_body, middlewares=[web.middleware(_too_large)])
    app[STATE_KEY] = state
    app.router.add_post("/events/{source}", _event)
    app.router.add_post("/events/{source}/{secret}", _event)
    app.router.add_get("/jobs", _jobs)
    app.router.add_get("/jobs/{id}", _job)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)

    async def close(_app: web.Application) -> None:
        state.close()

    app.on_cleanup.append(close)
    return app


# -- the service: web server plus worker processes -------------------------------------------------------------

def _start_worker(state: ServiceState, index: int) -> multiprocessing.process.BaseProcess:
    from sconify.service.worker import worker_main

    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger("sconify").getEffectiveLevel()
    proc = ctx.Process(target=worker_main, args=(state.config, index, os.getpid(), level),
                       name=f"sconify-worker-{index}", daemon=False)
    proc.start()
    return proc


async def _supervise(state: ServiceState) -> None:
    """Start the workers and restart any that dies (a crash in a conversion must not stop the service)."""
    for i in range(state.config.workers):
        state.workers.append(_start_worker(state, i))
    while True:
        await asyncio.sleep(1.0)
        for i, proc in enumerate(state.workers):
            if not proc.is_alive():
                log.warning("worker %d exited with code %s; starting it again", i, proc.exitcode)
                state.workers[i] = _start_worker(state, i)


def _stop_workers(state: ServiceState, grace: float = 20.0) -> None:
    for proc in state.workers:
        if proc.is_alive() and proc.pid:
            os.kill(proc.pid, 15)
    deadline = time.monotonic() + grace
    for proc in state.workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("worker %s did not stop in %.0f s; killing it", proc.name, grace)
            proc.kill()
            proc.join(5)


def serve(config: ServiceConfig) -> None:
    """Run the service until SIGTERM or SIGINT: the HTTP server plus ``config.workers`` worker processes."""
    make_private_dir(config.state_dir)
    make_private_dir(config.policy_dir)
    if config.cache_dir is not None:
        config.cache_dir.mkdir(parents=True, exist_ok=True)
    app = make_app(config)
    state = app[STATE_KEY]
    supervisor: list[asyncio.Task[None]] = []

    async def start(_app: web.Application) -> None:
        if config.broker:
            from sconify.service.dispatch import CeleryDispatcher

            state.dispatcher = CeleryDispatcher(config)
            state.dispatcher.start()
        else:
            supervisor.append(asyncio.get_running_loop().create_task(_supervise(state)))

    async def stop(_app: web.Application) -> None:
        for task in supervisor:
            task.cancel()
        loop = asyncio.get_running_loop()
        if state.dispatcher is not None:
            await loop.run_in_executor(None, state.dispatcher.stop)
        await loop.run_in_executor(None, _stop_workers, state)

    app.on_startup.append(start)
    app.on_shutdown.append(stop)

    def announce(_text: str) -> None:  # called by aiohttp once the socket listens
        where = f"Celery workers at {_redact_url(config.broker)}" if config.broker else f"{config.workers} workers"
        log.info("sconify %s serving on http://%s with %s, store %s", __version__, config.listen, where,
                 config.store)

    try:
        web.run_app(app, host=config.host, port=config.port, access_log_class=_AccessLogger,
                    access_log=logging.getLogger("sconify.service.access"), print=announce, shutdown_timeout=5.0,
                    handle_signals=True)
    except OSError as exc:
        _stop_workers(state, grace=5)
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise UsageError(f"cannot listen on {config.listen} ({exc.strerror}); choose another address with "
                             "--listen or 'listen:'.") from None
        raise
