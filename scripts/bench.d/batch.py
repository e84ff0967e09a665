"""Benchmark of ``sconify batch``: a catalogue of images that share base layers, cold and warm, 1 and 2 workers.

Run as ``scripts/bench batch [--images 20] [--base-size 64MiB] [--top-size 1MiB] [--workers 1,2] [--repeat 1]
[--keep]``.
The fixture builder's ``shared-base`` image family (busybox, ``--base-size`` bytes of libraries under
/usr/lib/shared, and a top layer of its own per image) is written as ``--images`` tags of one OCI layout, and a
jobs file converts each image with /usr/lib/shared encrypted, so that the shared base layer must be sealed.
For each number of workers ``sconify batch`` runs, each as a child process timed from outside:

- cold: a new job store and an empty layer cache;
- no cache: a new store with ``--no-cache`` (every job seals every layer itself), for comparison;
- warm cache: a new store and new destinations, the cold run's layer cache: every job runs, layers come from
  the cache;
- warm re-run: the cold run's store, jobs file and destinations again: every job was done before.

The reports give the layers each run sealed or copied itself (built) and those it took from the cache. The goal:
the shared base layers are built once per cold run, and a warm re-run takes under 5 % of the cold run.
With ``--repeat N`` every run is made N times (each with its own stores, caches and outputs) and the median
time is shown.
"""

from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHARED = "/usr/lib/shared"


@dataclass(frozen=True)
class Run:
    """One ``sconify batch`` run: wall seconds and what its report says."""

    workers: int
    kind: str
    seconds: float
    jobs_run: int
    done_before: int
    built: int
    from_cache: int
    shared_built: int  # how often the two shared base layers were built (2 = once each)


def build_catalogue(out: Path, images: int, base_size: str, top_size: str) -> list[str]:
    from fixtures.builder import build_image

    refs = []
    for variant in range(images):
        result = build_image("shared-base", out, f"v{variant}", variant=variant, base_size=base_size,
                             top_size=top_size)
        refs.append(result.reference)
    return refs


def write_jobs(path: Path, refs: list[str], keys: Path, outputs: str) -> None:
    import yaml

    data = {
        "version": 1,
        "defaults": {
            "destination": f"oci:{outputs}/{{name}}:latest",
            "policy-out": f"{outputs}-policies/{{name}}",
            "fspf-key": str(keys / "fspf.key"),
            "enclave-key": str(keys / "enclave.pem"),
            "encrypt": [SHARED],
        },
        "jobs": [{"name": f"image-{i:02d}", "source": ref} for i, ref in enumerate(refs)],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_batch(cmd: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return seconds, json.loads(proc.stdout)


def summarize(workers: int, kind: str, seconds: float, report: dict[str, Any]) -> Run:
    jobs = report["jobs"]
    fresh = [j for j in jobs if not j["done_before"]]
    shared = sum(1 for j in fresh for layer in j["layers"][:2] if layer["action"] != "cached")
    return Run(workers, kind, seconds, len(fresh), len(jobs) - len(fresh), report["layers"]["built"],
               report["layers"]["from_cache"], shared)


def median_runs(runs: list[Run]) -> list[Run]:
    """One run per (workers, kind), in first-seen order, with the median time of its repeats."""
    import statistics

    groups: dict[tuple[int, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.workers, r.kind), []).append(r)
    return [replace(group[0], seconds=statistics.median(r.seconds for r in group)) for group in groups.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="images in the catalogue (default 20)")
    parser.add_argument("--base-size", default="64MiB", help="bytes of the shared base layer (default 64MiB)")
    parser.add_argument("--top-size", default="1MiB", help="bytes of each image's own layer (default 1MiB)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run (default 1,2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind; the median is shown (default 1)")
    parser.add_argument("--workdir", default=None, help="where to put images and outputs (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="sconify-bench-batch-", dir=args.workdir))
    env = {**os.environ}
    env.setdefault("SCONIFY_RUNTIME", "/usr/bin/busybox")  # any static ELF converts; the built runtime if set
    sconify = [sys.executable, "-m", "sconify", "-q"]
    try:
        start = time.perf_counter()
        refs = build_catalogue(work / "images", args.images, args.base_size, args.top_size)
        print(f"catalogue: {args.images} shared-base images (base {args.base_size} + top {args.top_size} each) "
              f"built in {time.perf_counter() - start:.1f} s under {work}")
        keys = work / "keys"
        keys.mkdir()
        (keys / "fspf.key").write_text(os.urandom(32).hex() + "\n")
        subprocess.run([*sconify, "keys", "generate", "--enclave", str(keys / "enclave.pem")], check=True,
                       capture_output=True, env=env)

        runs: list[Run] = []
        commands: list[str] = []
        for workers, rep in [(w, r) for w in counts for r in range(args.repeat)]:
            tag = f"w{workers}-r{rep}"
            jobs = work / f"jobs-{tag}.yaml"
            write_jobs(jobs, refs, keys, str(work / f"out-{tag}"))
            cold_store = work / f"store-{tag}" / "jobs.db"
            cache = work / f"cache-{tag}"
            base = [*sconify, "batch", str(jobs), "--jobs", str(workers), "--json"]

            cold = [*base, "--store", str(cold_store), "--cache", str(cache)]
            runs.append(summarize(workers, "cold", *run_batch(cold, env)))

            jobs_nc = work / f"jobs-{tag}-nocache.yaml"
            write_jobs(jobs_nc, refs, keys, str(work / f"out-{tag}-nocache"))
            nocache = [*sconify, "batch", str(jobs_nc), "--jobs", str(workers), "--json", "--store",
                       str(work / f"store-{tag}-nocache" / "jobs.db"), "--no-cache"]
            runs.append(summarize(workers, "no cache", *run_batch(nocache, env)))

            jobs_warm = work / f"jobs-{tag}-warm.yaml"
            write_jobs(jobs_warm, refs, keys, str(work / f"out-{tag}-warm"))
            warm = [*sconify, "batch", str(jobs_warm), "--jobs", str(workers), "--json", "--store",
                    str(work / f"store-{tag}-warm" / "jobs.db"), "--cache", str(cache)]
            runs.append(summarize(workers, "warm cache", *run_batch(warm, env)))

            runs.append(summarize(workers, "warm re-run", *run_batch(cold, env)))
            if rep == 0:
                commands += [" ".join(cold), " ".join(nocache), " ".join(warm)]
        runs = median_runs(runs)

        print()
        print(f"`sconify batch`, {args.images} images sharing 2 base layers (busybox; {args.base_size} under "
              f"{SHARED}, encrypted), top layer {args.top_size} each; {os.cpu_count()} CPUs; "
              f"median of {args.repeat}")
        print()
        print("| workers | run | wall | vs cold | jobs run | done before | layers built | layers from cache "
              "| shared base layers built |")
        print("|---|---|---|---|---|---|---|---|---|")
        cold_seconds = {r.workers: r.seconds for r in runs if r.kind == "cold"}
        for r in runs:
            ratio = 100 * r.seconds / cold_seconds[r.workers]
            print(f"| {r.workers} | {r.kind} | {r.seconds:.2f} s | {ratio:.1f} % | {r.jobs_run} | {r.done_before} "
                  f"| {r.built} | {r.from_cache} | {r.shared_built} |")
        print()
        print("Commands (cold; no cache; warm cache; the warm re-run repeats the cold command):")
        for command in commands:
            print(f"    {command.replace(sys.executable, 'python')}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
