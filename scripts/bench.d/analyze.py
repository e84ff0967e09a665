"""Benchmark of ``sconify analyze`` on a generated image of at least 1 GiB: time, memory and bytes read.

Run as ``scripts/bench analyze [--size 1GiB] [--layers 4] [--compression gzip,none] [--repeat 3] [--keep]``.
The fixture builder's ``big`` image (busybox, /app/run.sh, ``--size`` bytes of generated data in files of
256 B to 64 MiB) is written to an OCI layout per compression under a temp dir. ``sconify -q analyze --json``
then runs in a child process per repeat; its wall and CPU time and peak RSS come from ``wait4``, the bytes it
read from the analysis itself (``reads``): compressed blob bytes, uncompressed tar bytes, the header pass, the
file content it looked at, and how often each layer was streamed. Medians over the repeats are printed.
"""

from __future__ import annotations

import os
import sys

# Keep this directory off the path: its copy.py would hide the standard module ``copy``.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def build(out: Path, size: str, layers: int, compression: str) -> tuple[str, int, float]:
    """The benchmark image as ``oci:DIR:v1``, its blob bytes and the seconds the build took."""
    from fixtures.builder import build_image

    start = time.perf_counter()
    result = build_image("big", out, "v1", size=size, layers=layers, compression=compression)
    seconds = time.perf_counter() - start
    blobs = sum(p.stat().st_size for p in (out / "blobs" / "sha256").iterdir())
    return result.reference, blobs, seconds


def run(reference: str) -> tuple[float, float, float, dict]:
    """One analysis in a child process: wall s, CPU s, peak RSS MiB, and its JSON document."""
    cmd = [sys.executable, "-m", "sconify", "-q", "analyze", reference, "--json"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"analyze failed with exit code {code}: {' '.join(cmd)}\n{err}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="generated data in the image (default 1GiB)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the image (>= 3)")
    parser.add_argument("--compression", default="gzip,none", help="comma-separated: gzip, none, zstd")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the images in the temp dir")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sconify-bench-analyze-"))
    try:
        for compression in args.compression.split(","):
            layout = work / f"big-{compression}"
            reference, blobs, build_s = build(layout, args.size, args.layers, compression)
            runs = [run(reference) for _ in range(args.repeat)]
            doc = runs[-1][3]
            reads, tree = doc["reads"], doc["tree"]
            tar_bytes = reads["header_pass_uncompressed_bytes"]
            print(f"analyze: big image, size {args.size}, {args.layers} layers, {compression} "
                  f"({blobs / MiB:.1f} MiB of blobs, {tar_bytes / MiB:.1f} MiB of tar; built in {build_s:.1f} s)")
            print(f"  tree: {tree['entries']} entries, {tree['files']} files, {tree['bytes'] / MiB:.1f} MiB of "
                  "file data")
            print(f"  wall: median {statistics.median(r[0] for r in runs):.2f} s "
                  f"(runs: {', '.join(f'{r[0]:.2f}' for r in runs)}); "
                  f"cpu: median {statistics.median(r[1] for r in runs):.2f} s; "
                  f"peak RSS: max {max(r[2] for r in runs):.0f} MiB")
            print(f"  read: {reads['compressed_bytes'] / MiB:.1f} MiB of blobs, "
                  f"{reads['uncompressed_bytes'] / MiB:.1f} MiB of tar streamed; "
                  f"header pass {reads['header_pass_compressed_bytes'] / MiB:.1f} MiB / "
                  f"{reads['header_pass_uncompressed_bytes'] / MiB:.1f} MiB")
            print(f"  content looked at: {reads['content_bytes'] / 1024:.1f} KiB in {reads['files_fetched']} "
                  f"files fetched in {reads['rounds']} rounds (+ heads of executables in the header pass); "
                  f"layer reads {reads['layer_reads']}")
            print(f"  content share of the file data: {reads['content_bytes'] / max(tree['bytes'], 1):.5%}")
            if not args.keep:
                shutil.rmtree(layout, ignore_errors=True)
    finally:
        if args.keep:
            print(f"images kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
