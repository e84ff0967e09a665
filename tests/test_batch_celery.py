"""``sconify batch --broker`` with a real redis-server and two real ``sconify worker`` processes: every job
completes with the results of the one-machine run, a worker killed with SIGKILL mid-job loses nothing (its job
completes on the other worker), and a redelivered or resent job is answered without converting again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra.procs import die_with_parent, free_port, log_tail, stop_process, wait_until

from fixtures.builder import build_image

pytest.importorskip("celery", reason="the distributed mode needs celery[redis]")

ENV = {**os.environ, "SCONIFY_RUNTIME": "/usr/bin/busybox"}
SHARED = "/usr/lib/shared"
VISIBILITY = 6  # seconds: short, so that a dead worker's job comes back within the test
LEASE = 3


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free 127.0.0.1 port, without persistence; stopped at the end."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing (apt-get install redis-server)")
        pytest.skip("redis-server is missing (apt-get install redis-server)")
    import redis

    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "no", "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )
    client = redis.Redis(host="127.0.0.1", port=port)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    if not wait_until(ready, 10, proc):
        stop_process(proc)
        pytest.fail(f"redis-server did not start: {log_tail(workdir / 'redis.log')}")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    logs: Path
    output: Path

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as a machine that dies."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def conversions(self) -> list[str]:
        """The jobs this worker started converting, from its logs."""
        return [line for p in self.logs.glob("*.log") for line in p.read_text().splitlines() if ": converting " in line]


def _start_worker(redis_url: str, base: Path, name: str) -> Worker:
    logs, output = base / f"{name}-logs", base / f"{name}.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sconify", "-v", "worker", "--broker", redis_url, "--concurrency", "1",
         "--cache", str(base / f"{name}-cache"), "--log-dir", str(logs), "--name", f"{name}@test",
         "--visibility-timeout", str(VISIBILITY), "--lease", str(LEASE)],
        stdout=output.open("wb"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
    )
    return Worker(f"{name}@test", proc, logs, output)


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[tuple[Worker, Worker]]:
    """Two workers (concurrency 1 each) on an empty Redis, both answering before the test starts."""
    import redis

    from sconify.batch.celery_app import make_app

    redis.Redis.from_url(redis_url).flushdb()
    pair = (_start_worker(redis_url, tmp_path, "wa"), _start_worker(redis_url, tmp_path, "wb"))
    app = make_app(redis_url)
    try:
        def both_ready() -> bool:
            answered = {name for reply in app.control.ping(timeout=0.5) for name in reply}
            return {w.name for w in pair} <= answered

        if not wait_until(both_ready, 30):
            pytest.fail("the workers did not start: " + " | ".join(log_tail(w.output) for w in pair))
        yield pair
    finally:
        for w in pair:
            w.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("batch-celery")
    for variant in range(4):
        build_image("shared-base", base / "images", f"v{variant}", variant=variant, base_size="1MiB",
                    top_size="64KiB")
        build_image("shared-base", base / "big", f"v{variant}", variant=variant, base_size="24MiB",
                    top_size="1MiB")
    keys = base / "keys"
    keys.mkdir()
    for i in range(5):
        (keys / f"fspf{i}.key").write_text(hashlib.sha256(b"celery%d" % i).hexdigest() + "\n")
    subprocess.run([sys.executable, "-m", "sconify", "keys", "generate", "--enclave", str(keys / "enc.pem")],
                   check=True, capture_output=True)
    return base


def _jobs(work: Path, kind: str) -> list[dict[str, Any]]:
    if kind == "small":
        return [{"name": f"v{v}", "source": f"oci:{work}/images:v{v}", "encrypt": [SHARED]} for v in range(4)]
    # each seals 24 MiB under its own key: slow enough to be caught mid-job, and no cache hits
    return [{"name": f"s{v}", "source": f"oci:{work}/big:v{v}", "encrypt": [SHARED],
             "fspf-key": str(work / "keys" / f"fspf{v + 1}.key")} for v in range(3)]


def _write_jobs(directory: Path, work: Path, kind: str, broker: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "version": 1,
        "defaults": {"destination": "oci:out/{name}:latest", "fspf-key": str(work / "keys" / "fspf0.key"),
                     "enclave-key": str(work / "keys" / "enc.pem")},
        "jobs": _jobs(work, kind),
    }
    if broker:
        data["broker"] = broker
    path = directory / "jobs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _batch(jobs_file: Path, *args: str, timeout: float = 150) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "sconify", "-q", "batch", str(jobs_file), "--json", *args],
                          capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _digests(report: dict[str, Any]) -> dict[str, str]:
    return {j["name"]: j["digest"] for j in report["jobs"]}


@pytest.fixture(scope="module")
def local_digests(work: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The output digests of the same jobs run on one machine, the reference for the distributed runs."""
    base = tmp_path_factory.mktemp("local")
    return {kind: _digests(_batch(_write_jobs(base / kind, work, kind), "--jobs", "2")) for kind in ("small", "slow")}


def test_two_workers_run_every_job_with_the_results_of_the_local_run(
    work: Path, tmp_path: Path, redis_url: str, workers: tuple[Worker, Worker], local_digests: dict[str, Any]
) -> None:
    jobs_file = _write_jobs(tmp_path / "dist", work, "small", broker=redis_url)
    report = _batch(jobs_file)
    assert [j["status"] for j in report["jobs"]] == ["succeeded"] * 4
    assert _digests(report) == local_digests["small"]
    used = {j["worker"].split("/")[0] for j in report["jobs"]}
    assert used == {w.name for w in workers}
    assert report["broker"] == redis_url
    for job in report["jobs"]:  # outputs and policies where the jobs file says
        assert (jobs_file.parent / "out" / job["name"] / "index.json").is_file()
        assert (jobs_file.parent / "policies" / job["name"] / "session.yml").is_file()


def test_a_worker_killed_mid_job_its_job_completes_on_the_other(
    work: Path, tmp_path: Path, redis_url: str, workers: tuple[Worker, Worker], local_digests: dict[str, Any]
) -> None:
    import redis

    from sconify.batch.celery_app import RESULT_PREFIX

    doomed, survivor = workers
    jobs_file = _write_jobs(tmp_path / "dist", work, "slow", broker=redis_url)
    batch = subprocess.Popen([sys.executable, "-m", "sconify", "-q", "batch", str(jobs_file), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    client = redis.Redis.from_url(redis_url)
    try:
        assert wait_until(lambda: bool(doomed.conversions()), 60, batch), "the worker never started a job"
        killed = doomed.conversions()[0].split("job ", 1)[1].split(":", 1)[0]
        assert not any(f"job {killed} succeeded" in p.read_text() for p in doomed.logs.glob("*.log"))
        doomed.kill()
        assert not client.keys(RESULT_PREFIX + "*") or len(client.keys(RESULT_PREFIX + "*")) < 3
        out, err = batch.communicate(timeout=150)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.wait()
    assert batch.returncode == 0, err
    report = json.loads(out)
    assert [j["status"] for j in report["jobs"]] == ["succeeded"] * 3
    assert _digests(report) == local_digests["slow"]
    by_name = {j["name"]: j for j in report["jobs"]}
    assert by_name[killed]["worker"].startswith(survivor.name)
    assert any(f"job {killed}: converting" in line for line in survivor.conversions())
    # The output of the killed attempt was never left half-written: the survivor's run replaced nothing partial.
    assert (jobs_file.parent / "out" / killed / "index.json").is_file()


def test_a_resent_job_is_answered_from_its_earlier_result_without_converting_again(
    work: Path, tmp_path: Path, redis_url: str, workers: tuple[Worker, Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sconify.batch.celery_app import QUEUE, TASK_NAME, make_app
    from sconify.batch.jobs import job_key, load_jobs, pin_source

    jobs_file = _write_jobs(tmp_path / "dist", work, "small", broker=redis_url)
    monkeypatch.setenv("SCONIFY_RUNTIME", ENV["SCONIFY_RUNTIME"])  # the runtime is part of the key
    spec = pin_source(load_jobs(jobs_file).specs[0])  # as the batch client keys it
    key = job_key(spec)
    app = make_app(redis_url)
    # The same job delivered twice at once (as a redelivery would): one conversion, one earlier result.
    results = [app.send_task(TASK_NAME, args=[spec.to_json(), key], queue=QUEUE) for _ in range(2)]
    answers = [r.get(timeout=90) for r in results]
    assert [a["status"] for a in answers] == ["succeeded", "succeeded"]
    assert sorted(a["reused"] for a in answers) == [False, True]
    assert answers[0]["result"]["digest"] == answers[1]["result"]["digest"]
    before = sum(len(w.conversions()) for w in workers)
    assert before == 1

    # A new client (its own store) sending the whole batch: the converted job is not converted again.
    report = _batch(jobs_file, "--store", str(tmp_path / "other-client" / "jobs.db"))
    assert [j["status"] for j in report["jobs"]] == ["succeeded"] * 4
    assert sum(len(w.conversions()) for w in workers) == before + 3
    # And the same client again: done before, nothing sent.
    again = _batch(jobs_file, "--store", str(tmp_path / "other-client" / "jobs.db"))
    assert all(j["done_before"] for j in again["jobs"])
    assert sum(len(w.conversions()) for w in workers) == before + 3
