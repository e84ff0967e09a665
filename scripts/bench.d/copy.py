"""Benchmark of the registry transport: ``sconify copy`` against ``skopeo copy`` on the same >= 1 GiB image.

Run as ``scripts/bench copy [--size 1.5GiB] [--layers 5] [--repeat 3] [--keep]``. Everything runs in this one
invocation: a generated image (the fixture builder's ``big`` image; --size is its uncompressed data, about
1.1 GiB of gzip blobs at the default) is written to an OCI layout under a temp dir, pushed once with skopeo to
a private registry on 127.0.0.1 (Debian's docker-registry, started through tests/infra), and then both tools
copy registry -> OCI layout (pull) and OCI layout -> a fresh registry (push; a new registry for every run, so
that neither tool finds blobs present or mountable). Each copy runs in its own child process whose peak RSS
is read from ``wait4``; the runs of the two tools alternate, and the medians are compared. The working files
and registries are removed at the end (unless --keep).
"""

from __future__ import annotations

import os
import sys

# This file is called copy.py: keep its directory off the path, or it hides the standard module ``copy``.
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
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts" / "lib"))

from infra.registry import Registry, start_registry  # noqa: E402

MiB = 1 << 20


from benchlib import Run, timed  # noqa: E402


def build_image(out: Path, size: str, layers: int) -> str:
    """The benchmark image as ``oci:DIR:v1``: the fixture builder's ``big`` image."""
    from fixtures.builder import build_image as build

    out.parent.mkdir(parents=True, exist_ok=True)
    return build("big", out, "v1", size=size, layers=layers).reference


def blob_bytes(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())


def layout_digest(layout: Path) -> str:
    return json.loads((layout / "index.json").read_text())["manifests"][-1]["digest"]


def sconify_cmd(src: str, dst: str) -> list[str]:
    return [sys.executable, "-m", "sconify", "-q", "copy", src, dst]


def skopeo_cmd(src: str, dst: str) -> list[str]:
    return ["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
            src, dst]


TOOLS = {"sconify": sconify_cmd, "skopeo": skopeo_cmd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1.5GiB", help="uncompressed data in the image (default 1.5GiB)")
    parser.add_argument("--layers", type=int, default=5, help="layers of the image (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and direction (default 3)")
    parser.add_argument("--workdir", default=None, help="where to put the image and registries (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing; scripts/bench installs it (Debian packages skopeo, docker-registry).")

    work = Path(tempfile.mkdtemp(prefix="sconify-bench-copy-", dir=args.workdir))
    registries: list[Registry] = []
    try:
        t0 = time.perf_counter()
        source = build_image(work / "image", args.size, args.layers)
        layout = work / "image"
        size = blob_bytes(layout)
        print(f"image: {source}, {size / MiB:.0f} MiB of blobs in {args.layers} layers "
              f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)
        origin = start_registry(work / "registry-src")
        registries.append(origin)
        remote = origin.ref("bench/src", "v1")
        subprocess.run(skopeo_cmd(source, remote), check=True, capture_output=True)
        expected = layout_digest(layout)

        results: dict[tuple[str, str], list[Run]] = {}
        for rep in range(args.repeat):
            tools = list(TOOLS)
            order = tools if rep % 2 == 0 else tools[::-1]
            for tool in order:
                out = work / f"pulled-{tool.rstrip('*')}"
                run = timed(TOOLS[tool](remote, f"oci:{out}:v1"))
                if layout_digest(out) != expected:
                    raise SystemExit(f"{tool} pulled {layout_digest(out)}, not {expected}")
                shutil.rmtree(out)
                results.setdefault(("pull", tool), []).append(run)
                print(f"  pull  {tool:8} run {rep + 1}: {run.seconds:6.2f} s, CPU {run.cpu:6.2f} s, "
                      f"peak RSS {run.peak_mib:6.1f} MiB", flush=True)
            for tool in order:
                target = start_registry(work / f"registry-{tool}-{rep}")
                registries.append(target)
                repo = f"bench/{tool.rstrip('*')}"
                run = timed(TOOLS[tool](source, target.ref(repo, "v1")))
                got = target.manifest(repo, "v1").headers.get("Docker-Content-Digest")
                if got != expected:
                    raise SystemExit(f"{tool} pushed {got}, not {expected}")
                target.stop()
                registries.remove(target)
                shutil.rmtree(target.workdir, ignore_errors=True)
                results.setdefault(("push", tool), []).append(run)
                print(f"  push  {tool:8} run {rep + 1}: {run.seconds:6.2f} s, CPU {run.cpu:6.2f} s, "
                      f"peak RSS {run.peak_mib:6.1f} MiB", flush=True)

        load = os.getloadavg()[0]
        command = f"scripts/bench copy --size {args.size} --layers {args.layers} --repeat {args.repeat}"
        print()
        print(f"Registry transport, `{command}` ({size / MiB:.0f} MiB image, {args.layers} layers, "
              f"median of {args.repeat}, {os.cpu_count()} cores, load {load:.1f} at the end):")
        print()
        print("| copy | sconify | skopeo | ratio | sconify CPU | skopeo CPU | sconify peak RSS | skopeo peak RSS |")
        print("|---|---|---|---|---|---|---|---|")
        names = {"pull": "registry -> oci layout", "push": "oci layout -> registry (new repo)"}
        rows = [("sconify", "")]
        for direction in ("pull", "push"):
            theirs = results[(direction, "skopeo")]
            for tool, mark in rows:
                ours = results[(direction, tool)]
                a, b = statistics.median(r.seconds for r in ours), statistics.median(r.seconds for r in theirs)
                cpu_a, cpu_b = statistics.median(r.cpu for r in ours), statistics.median(r.cpu for r in theirs)
                print(f"| {names[direction]}{mark} | {a:.2f} s ({size / MiB / a:.0f} MiB/s) | {b:.2f} s "
                      f"({size / MiB / b:.0f} MiB/s) | {a / b:.2f} "
                      f"| {cpu_a:.1f} s | {cpu_b:.1f} s "
                      f"| {max(r.peak_mib for r in ours):.0f} MiB | {max(r.peak_mib for r in theirs):.0f} MiB |")
    finally:
        for reg in registries:
            reg.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
