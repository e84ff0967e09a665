"""``sconify batch`` on one machine: every job runs (a failing one stops no other), shared base layers are sealed
once, finished jobs are never redone, and Ctrl-C, a crash or a dying worker process lose no work and leave no
half-written output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.builder import build_image
from sconify.batch.store import RUNNING, SUCCEEDED, JobStore

BUSYBOX = "/usr/bin/busybox"
ENV = {**os.environ, "SCONIFY_RUNTIME": BUSYBOX}
SHARED = "/usr/lib/shared"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images sharing base layers (small and bigger ones), a busybox image, and keys."""
    base = tmp_path_factory.mktemp("batch-local")
    for variant in range(4):
        build_image("shared-base", base / "images", f"v{variant}", variant=variant, base_size="1MiB",
                    top_size="64KiB")
        build_image("shared-base", base / "big", f"v{variant}", variant=variant, base_size="24MiB",
                    top_size="1MiB")
    build_image("busybox-sh", base / "busybox", "latest")
    keys = base / "keys"
    keys.mkdir()
    for i in range(6):
        (keys / f"fspf{i}.key").write_text(hashlib.sha256(b"fspf%d" % i).hexdigest() + "\n")
    subprocess.run([sys.executable, "-m", "sconify", "keys", "generate", "--enclave", str(keys / "enc.pem")],
                   check=True, capture_output=True)
    return base


def _write_jobs(path: Path, work: Path, jobs: list[dict[str, Any]], **defaults: Any) -> Path:
    data = {
        "version": 1,
        "defaults": {"destination": "oci:out/{name}:latest", "policy-out": "policies/{name}",
                     "fspf-key": str(work / "keys" / "fspf0.key"), "enclave-key": str(work / "keys" / "enc.pem"),
                     **defaults},
        "jobs": jobs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _batch(jobs_file: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sconify", "batch", str(jobs_file), *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=jobs_file.parent)


def _report(jobs_file: Path) -> dict[str, Any]:
    return json.loads((jobs_file.parent / ".sconify-batch" / "reports" / f"{jobs_file.stem}.json").read_text())


def _store(jobs_file: Path) -> JobStore:
    return JobStore(jobs_file.parent / ".sconify-batch" / "jobs.db")


def _conversions(jobs_file: Path, name: str) -> int:
    """How many times a job's conversion started, from its logs."""
    logs = jobs_file.parent / ".sconify-batch" / "logs"
    return sum(p.read_text().count(f"job {name}: converting") for p in logs.glob(f"job-*-{name}.log"))


def test_every_job_runs_a_failing_one_stops_no_other_and_shared_layers_are_sealed_once(work: Path,
                                                                                       tmp_path: Path) -> None:
    jobs = [{"name": f"v{v}", "source": f"oci:{work}/images:v{v}", "encrypt": [SHARED]} for v in range(3)]
    jobs.insert(1, {"name": "ghost", "source": f"oci:{tmp_path}/nothing-here:latest"})
    jobs_file = _write_jobs(tmp_path / "run" / "jobs.yaml", work, jobs)
    proc = _batch(jobs_file, "--jobs", "2", "--report", "report.json")
    assert proc.returncode == 14, proc.stderr
    assert "1 of 4 jobs failed" in proc.stderr and "report.json" in proc.stderr

    report = json.loads((jobs_file.parent / "report.json").read_text())
    by_name = {j["name"]: j for j in report["jobs"]}
    assert [j["name"] for j in report["jobs"]] == ["v0", "ghost", "v1", "v2"]
    assert report["counts"]["succeeded"] == 3 and report["counts"]["failed"] == 1
    ghost = by_name["ghost"]
    assert ghost["status"] == "failed" and "nothing-here" in ghost["error"] and ghost["digest"] is None

    for name in ("v0", "v1", "v2"):
        job = by_name[name]
        assert job["status"] == "succeeded" and job["error"] is None
        # skopeo, an independent reader, sees the manifest the report names.
        raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{jobs_file.parent}/out/{name}:latest"],
                             capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == job["digest"]
        assert job["source_digest"] == build_image("shared-base", tmp_path / "check", name, variant=int(name[1]),
                                                   base_size="1MiB", top_size="64KiB").digest
        assert (jobs_file.parent / "policies" / name / "session.yml").is_file()
        assert Path(job["log"]).is_file()
    # The shared base layers (busybox, and the sealed /usr/lib/shared) were made by one job, the others took
    # them from the cache, although two jobs ran at a time.
    for index in (0, 1):
        actions = sorted(by_name[n]["layers"][index]["action"] for n in ("v0", "v1", "v2"))
        assert actions.count("cached") == 2, actions
    assert sorted(by_name[n]["layers"][1]["action"] for n in ("v0", "v1", "v2")) == ["cached", "cached", "rewritten"]

    # The summary table names every job with its digests and status.
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["JOB", "SOURCE", "DIGEST", "OUTPUT", "DIGEST", "MRENCLAVE", "TIME", "STATUS"]
    row = next(line for line in lines if line.startswith("v1 "))
    assert by_name["v1"]["digest"][:19] in row and by_name["v1"]["mrenclave"][:16] in row and "succeeded" in row
    assert "failed: " in next(line for line in lines if line.startswith("ghost "))


def test_a_job_done_before_is_not_redone_and_a_changed_one_is(work: Path, tmp_path: Path) -> None:
    jobs = [{"name": "a", "source": f"oci:{work}/images:v0"}, {"name": "b", "source": f"oci:{work}/busybox:latest"}]
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", work, jobs)
    first = _batch(jobs_file, "--jobs", "2", "--json")
    assert first.returncode == 0, first.stderr
    before = {j["name"]: j for j in json.loads(first.stdout)["jobs"]}
    index = tmp_path / "out" / "a" / "index.json"
    stamp = index.stat().st_mtime_ns

    second = _batch(jobs_file, "--json")
    assert second.returncode == 0, second.stderr
    after = {j["name"]: j for j in json.loads(second.stdout)["jobs"]}
    assert all(j["done_before"] and j["status"] == "succeeded" for j in after.values())
    assert {n: j["digest"] for n, j in after.items()} == {n: j["digest"] for n, j in before.items()}
    assert index.stat().st_mtime_ns == stamp
    assert _conversions(jobs_file, "a") == 1 and _conversions(jobs_file, "b") == 1

    jobs[1]["heap"] = "256M"  # another option: another job
    _write_jobs(jobs_file, work, jobs)
    third = _batch(jobs_file, "--json")
    assert third.returncode == 0, third.stderr
    final = {j["name"]: j for j in json.loads(third.stdout)["jobs"]}
    assert final["a"]["done_before"] and not final["b"]["done_before"]
    assert final["b"]["mrenclave"] != before["b"]["mrenclave"]  # the heap is measured
    assert _conversions(jobs_file, "a") == 1 and _conversions(jobs_file, "b") == 2

    forced = _batch(jobs_file, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert _conversions(jobs_file, "a") == 2
    assert json.loads(forced.stdout)["jobs"][0]["digest"] == before["a"]["digest"]  # reproducible


def _slow_jobs(work: Path, n: int) -> list[dict[str, Any]]:
    """Jobs that each seal 24 MiB under their own key (no cache hits), so that each takes a while."""
    return [{"name": f"s{v}", "source": f"oci:{work}/big:v{v}", "encrypt": [SHARED],
             "fspf-key": str(work / "keys" / f"fspf{v + 1}.key")} for v in range(n)]


def _wait_for(check: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"the batch ended early ({proc.returncode}): {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the batch")
        time.sleep(0.05)


def _start(jobs_file: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sconify", "-q", "batch", str(jobs_file), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=jobs_file.parent, start_new_session=True)


def _running_and_done(store: JobStore, done: int) -> bool:
    counts = store.counts()
    return counts[SUCCEEDED] >= done and counts[RUNNING] >= 1


def test_ctrl_c_stops_cleanly_and_resume_finishes_without_redoing(work: Path, tmp_path: Path) -> None:
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", work, _slow_jobs(work, 3))
    proc = _start(jobs_file, "--jobs", "1")
    _wait_for(lambda: (tmp_path / ".sconify-batch" / "jobs.db").exists(), proc)
    store = _store(jobs_file)
    _wait_for(lambda: _running_and_done(store, 1), proc)
    interrupted = next(j for j in store.list() if j.status == RUNNING)
    # Claimed is not yet converting: wait for the conversion to have begun, so that Ctrl-C interrupts it.
    _wait_for(lambda: _conversions(jobs_file, interrupted.spec["name"]) == 1, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert store.counts()[RUNNING] == 0  # given back to the queue
    name = interrupted.spec["name"]
    assert not (tmp_path / "out" / name / "index.json").exists()  # no half-written output
    assert not (tmp_path / "policies" / name).exists()
    assert not [p for p in (tmp_path / "policies").iterdir() if p.name.startswith(".")]

    resumed = _batch(jobs_file, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert [j["status"] for j in report["jobs"]] == ["succeeded"] * 3
    assert _conversions(jobs_file, "s0") == 1  # finished before Ctrl-C: not redone
    assert _conversions(jobs_file, name) == 2
    assert (tmp_path / "out" / name / "index.json").is_file()


def test_a_crashed_run_resumes_at_once(work: Path, tmp_path: Path) -> None:
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", work, _slow_jobs(work, 2))
    proc = _start(jobs_file, "--jobs", "1")
    _wait_for(lambda: (tmp_path / ".sconify-batch" / "jobs.db").exists(), proc)
    store = _store(jobs_file)
    _wait_for(lambda: store.counts()[RUNNING] >= 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run dies: no chance to clean up
    proc.communicate(timeout=30)
    started = time.monotonic()
    resumed = _batch(jobs_file, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert [j["status"] for j in json.loads(resumed.stdout)["jobs"]] == ["succeeded"] * 2
    # The dead run's job was taken back at once, not after its 60 s lease.
    assert time.monotonic() - started < 45


def test_a_worker_process_killed_mid_job_is_replaced_and_its_job_runs_again(work: Path, tmp_path: Path) -> None:
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", work, _slow_jobs(work, 2))
    proc = _start(jobs_file, "--jobs", "1", "--json")
    _wait_for(lambda: (tmp_path / ".sconify-batch" / "jobs.db").exists(), proc)
    store = _store(jobs_file)
    _wait_for(lambda: store.counts()[RUNNING] >= 1, proc)
    victim = next(j for j in store.list() if j.status == RUNNING)
    assert victim.worker is not None
    os.kill(int(victim.worker.split("/")[1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    jobs = {j["name"]: j for j in json.loads(out)["jobs"]}
    assert all(j["status"] == "succeeded" for j in jobs.values())
    assert jobs[victim.spec["name"]]["attempts"] == 2


def test_resume_without_an_earlier_run_says_what_to_do(work: Path, tmp_path: Path) -> None:
    jobs_file = _write_jobs(tmp_path / "jobs.yaml", work, [{"source": f"oci:{work}/images:v0"}])
    proc = _batch(jobs_file, "--resume")
    assert proc.returncode == 2
    assert "no earlier run" in proc.stderr and "without --resume" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  - source: oci:x\n    threads: many\n")
    proc = _batch(bad)
    assert proc.returncode == 2
    assert "job 1 (source 'oci:x'), field 'threads'" in proc.stderr
