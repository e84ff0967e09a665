"""Benchmark of the service's event acceptance: latency (p50, p99, max) and throughput of a burst of registry
notifications sent from a second process over loopback, with the workers idle and while they convert.

Run as ``scripts/bench service [--events 2000] [--concurrency 16] [--distinct 500] [--convert 4] [--size 128M]
[--keep]``.
Everything runs in this one invocation: a private registry (Debian's docker-registry, through tests/infra) whose
notifications go to ``sconify serve`` (2 worker processes, its own store, policies and cache under a temp dir).
Phase "idle": bursts while no conversion runs, with one connection (as a registry delivers: one event after the
other) and with ``--concurrency`` connections. Phase "converting": ``--convert`` generated images (shared-base,
``--size`` of encrypted data each) are pushed with skopeo first, so that both workers convert during the bursts;
they start once two conversions run, and the table shows how many still ran at the end. Each burst is
``--events`` distribution envelopes (one push each) for ``--distinct`` different digests (the rest are
duplicates), sent by a separate Python process with ``--concurrency`` keep-alive connections (aiohttp
client); every answer must be 202. The goal is p99 under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from infra.procs import free_port  # noqa: E402
from infra.registry import start_registry  # noqa: E402
from test_service_support import Service  # noqa: E402

from fixtures import build_image  # noqa: E402
from sconify.batch.store import JobStore  # noqa: E402

AUTH = "Bearer " + secrets.token_hex(16)

# The load generator: a separate process, so that its CPU use is not the service's.
_CLIENT = r"""
import asyncio, json, sys, time
import aiohttp

url, auth, count, concurrency, distinct, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]

def body(i):
    n = i % distinct
    digest = "sha256:" + f"{tag}{n:08x}".encode().hex()[:64].ljust(64, "0")
    return json.dumps({"events": [{"id": f"{tag}-{i}", "action": "push", "timestamp": "2025-01-01T00:00:00Z",
        "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": f"burst/app{n % 50}",
                   "digest": digest, "tag": "1"}}]}).encode()

async def main():
    headers = {"Content-Type": "application/vnd.docker.distribution.events.v1+json", "Authorization": auth}
    latencies, statuses = [], {}
    queue = list(range(count))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one_worker():
            while queue:
                i = queue.pop()
                data = body(i)
                t0 = time.perf_counter()
                async with session.post(url, data=data, headers=headers) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t0)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
        start = time.perf_counter()
        await asyncio.gather(*(one_worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    print(json.dumps({"latencies": latencies, "wall": wall, "statuses": statuses}))

asyncio.run(main())
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def burst(service: Service, events: int, concurrency: int, distinct: int, tag: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", _CLIENT, service.url + "/events/local", AUTH, str(events),
                           str(concurrency), str(distinct), tag], capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout)
    lat = [x * 1000 for x in got["latencies"]]
    if got["statuses"] != {"202": events}:
        raise SystemExit(f"unexpected answers: {got['statuses']}")
    return {"events": events, "p50": statistics.median(lat), "p99": percentile(lat, 99), "max": max(lat),
            "throughput": events / got["wall"], "wall": got["wall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=500)
    parser.add_argument("--convert", type=int, default=4, help="images converted during the second burst")
    parser.add_argument("--size", default="128M", help="encrypted data of each converted image")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sconify-bench-service-"))
    env_runtime = ROOT / "sconify" / "data" / "runtime" / "sconify-run"
    if not env_runtime.is_file():
        os.environ.setdefault("SCONIFY_RUNTIME", "/usr/bin/busybox")
    port = free_port()
    registry = start_registry(work / "registry", overrides={"notifications": {"endpoints": [{
        "name": "sconify", "url": f"http://127.0.0.1:{port}/events/local", "headers": {"Authorization": [AUTH]},
        "timeout": "5s", "threshold": 3, "backoff": "500ms", "ignoredmediatypes": ["application/octet-stream"]}]}})
    fspf = work / "fspf.key"
    fspf.write_text(secrets.token_hex(32))
    config = {
        "workers": 2,
        "sources": {"local": {"type": "distribution", "registry": registry.host, "authorization": AUTH}},
        "routes": [
            {"name": "vendor", "match": "vendor/*", "destination": f"docker://{registry.host}/confidential/*",
             "keys": {"fspf": str(fspf)}},
            # The burst's images do not exist: their jobs queue behind the real ones and fail later.
            {"name": "burst", "match": "burst/*", "destination": f"docker://{registry.host}/burst-conf/*"},
        ],
        "retry": {"attempts": 1},
    }
    service = Service(work / "service", config, port=port).start()
    rows = []
    try:
        layout = work / "images"
        for v in range(args.convert):
            build_image("shared-base", layout, f"v{v}", variant=v, base_size="4M", top_size=args.size)
        levels = sorted({1, args.concurrency})
        for level in levels:
            rows.append((f"idle workers, {level} connection{'s' if level > 1 else ''}",
                         burst(service, args.events, level, args.distinct, f"idle{level}"), "-"))

        for v in range(args.convert):
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v{v}",
                            f"docker://{registry.host}/vendor/app{v}:1"], check=True)
        deadline = time.monotonic() + 60
        while service.counts()["running"] < 2:
            if time.monotonic() > deadline:
                raise SystemExit("the conversions did not start")
            time.sleep(0.05)
        for level in levels:
            running_before = service.counts()["running"]
            result = burst(service, args.events, level, args.distinct, f"busy{level}")
            running_after = service.counts()["running"]
            rows.append((f"2 workers converting, {level} connection{'s' if level > 1 else ''}", result,
                         f"{running_before} / {running_after}"))
        store = JobStore(work / "service" / "state" / "jobs.sqlite")

        def vendor_jobs() -> list:
            return [j for j in store.list() if j.spec.get("route") == "vendor"]

        while any(not j.finished for j in vendor_jobs()):
            time.sleep(0.5)
        durations = [j.result["seconds"] for j in vendor_jobs() if j.status == "succeeded" and j.result]
        conversions = (f"{len(durations)} conversions of {statistics.median(durations):.1f} s (median)"
                       if durations else "no conversion finished")
    finally:
        service.stop()
        registry.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)

    cpu = os.cpu_count()
    print(f"\n### Service: event acceptance ({args.events} events, {args.distinct} distinct, "
          f"{args.concurrency} connections, {cpu} CPUs)\n")
    print("| phase | p50 ms | p99 ms | max ms | events/s | running before / after |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r, running in rows:
        print(f"| {name} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['throughput']:.0f} | {running} |")
    print(f"\nBackground work in the second phase: {conversions}. Goal: p99 < 50 ms.")
    print(f"Command: scripts/bench service --events {args.events} --concurrency {args.concurrency} "
          f"--distinct {args.distinct} --convert {args.convert} --size {args.size}")


if __name__ == "__main__":
    main()
