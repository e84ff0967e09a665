"""Benchmark: enclave measurement (MRENCLAVE) for large heaps, SGXS export and parse, SIGSTRUCT signing.

Run as `scripts/bench enclave [--heaps 1G,16G,64G] [--repeat 3]`. Prints one line per figure: the best
wall-clock time of the repeats. Runtime and executable are /usr/bin/busybox (Debian busybox-static).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sconify.enclave import EnclaveSettings, SigstructBody, generate_enclave_key, measure, parse_sgxs, sign
from sconify.enclave.settings import format_size, parse_size

BUSYBOX = Path("/usr/bin/busybox")


def best(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heaps", default="1G,16G,64G", help="comma-separated heap sizes to measure")
    parser.add_argument("--export-heap", default="4G", help="heap size for the SGXS export/parse figures")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    runtime = BUSYBOX.read_bytes()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; python {platform.python_version()}; "
          f"runtime and executable: {BUSYBOX} ({len(runtime)} bytes); best of {args.repeat}")

    for heap in args.heaps.split(","):
        settings = EnclaveSettings.from_options(heap=heap)
        pages = settings.heap // 4096
        t = best(args.repeat, lambda settings=settings: measure(runtime, runtime, settings))
        print(f"measure, heap {format_size(settings.heap):>5}: {t:7.3f} s  "
              f"({pages} heap EADD records, {pages * 64 / t / 2**20:,.0f} MiB/s of records hashed)")

    settings = EnclaveSettings.from_options(heap=args.export_heap)
    m = measure(runtime, runtime, settings)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "enclave.sgxs"
        t_write = best(args.repeat, lambda: m.write_sgxs(out))
        size = out.stat().st_size

        def parse() -> None:
            with open(out, "rb") as f:
                assert parse_sgxs(f).mrenclave == m.mrenclave

        t_parse = best(args.repeat, parse)
        t_hash = best(args.repeat, lambda: hashlib.sha256(out.read_bytes()).digest())
    heap_text = format_size(parse_size(args.export_heap))
    print(f"SGXS export, heap {heap_text}: {t_write:7.3f} s  ({size:,} bytes, fsynced)")
    print(f"SGXS parse,  heap {heap_text}: {t_parse:7.3f} s  (all canonical checks; sha256sum alone: {t_hash:.3f} s)")

    start = time.perf_counter()
    key = generate_enclave_key()
    print(f"key generation (RSA-3072, e=3): {time.perf_counter() - start:7.3f} s (one run; random)")
    body = SigstructBody.for_enclave(m.mrenclave)
    print(f"sign SIGSTRUCT (with Q1, Q2):   {best(args.repeat, lambda: sign(body, key)):7.3f} s")
    sig = sign(body, key)
    print(f"verify SIGSTRUCT:               {best(args.repeat, sig.problems):7.3f} s")


if __name__ == "__main__":
    main()
