"""Benchmark: what sconify-run costs at start: measuring the enclave, verifying and decrypting protected files.

Run as root: `.venv/bin/python runtime/bench.py [--encrypted 64M] [--authenticated 64M] [--files 2000]
[--repeat 3]` (meant to become `scripts/bench runtime`). Prints one line per figure, the best wall-clock
time of the repeats:

- `--measure` for the default settings and for a 16G heap (executable: static busybox);
- a first start in a chroot (verify everything, decrypt the encrypted files in place) and a second start of
  the same root (verify the plaintext left by the first), for a tree with the given amounts of encrypted
  and authenticated data spread over small and large files; the application is `/bin/true`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sconify.enclave.measurement import measure
from sconify.enclave.settings import EnclaveSettings, format_size, parse_size
from sconify.fspf import RegionTable, VolumeKey, protect_directory

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "sconify" / "data" / "runtime" / "sconify-run"
BUSYBOX = Path("/usr/bin/busybox")
METADATA = "/.sconify/fspf/volume.fspf"


def best(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fill(path: Path, size: int, seed: int) -> None:
    block = bytes((seed * 31 + i) % 251 for i in range(1 << 16))
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def make_tree(src: Path, encrypted: int, authenticated: int, files: int) -> None:
    (src / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, src / "bin/busybox")
    (src / "bin/true").symlink_to("busybox")
    for d in ("proc", "tmp", "run", ".sconify/bin", "app/small", "lib/small"):
        (src / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(RUNTIME, src / ".sconify/bin/sconify-run")
    # Half of each amount in one big file, the rest in small files.
    for region, amount in (("app", encrypted), ("lib", authenticated)):
        fill(src / region / "big.bin", amount // 2, 1)
        small = max(1, (amount - amount // 2) // max(1, files // 2))
        for i in range(files // 2):
            fill(src / region / "small" / f"f{i:05d}", small, i)


def run_start(root: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
         'mount -t proc proc "$0/proc" && exec chroot "$0" /.sconify/bin/sconify-run', str(root)],
        env=env, capture_output=True, timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"sconify-run failed ({done.returncode}): {done.stderr.decode().strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encrypted", default="64M", help="bytes of encrypted files")
    parser.add_argument("--authenticated", default="64M", help="bytes of authenticated files")
    parser.add_argument("--files", type=int, default=2000, help="number of small files (half in each region)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("runtime/bench.py needs root (chroot, mount); run it as root.")
    if not RUNTIME.exists():
        raise SystemExit(f"{RUNTIME} is missing; run scripts/build-runtime first.")
    encrypted, authenticated = parse_size(args.encrypted), parse_size(args.authenticated)

    print(f"# sconify-run start-up on {platform.machine()}, {os.cpu_count()} CPUs, runtime "
          f"{RUNTIME.stat().st_size} bytes")
    def measure_with(heap: str) -> None:
        env = {"SCONIFY_EXECUTABLE": str(BUSYBOX), "SCONE_HEAP": heap}
        subprocess.run([str(RUNTIME), "--measure"], env=env, check=True, capture_output=True)

    for heap in ("64M", "16G"):
        took = best(args.repeat, functools.partial(measure_with, heap))
        print(f"measure (busybox, heap {heap}): {took * 1000:.1f} ms")

    with tempfile.TemporaryDirectory(prefix="sconify-run-bench-") as tmp:
        base = Path(tmp)
        make_tree(base / "src", encrypted, authenticated, args.files)
        key = VolumeKey.generate()
        regions = RegionTable.of(["authenticated:/", "encrypted:/app", "not-protected:/proc", "not-protected:/tmp",
                                  "not-protected:/run"])
        mrenclave = measure(RUNTIME.read_bytes(), BUSYBOX.read_bytes(), EnclaveSettings()).mrenclave.hex()
        env = {"SCONE_CONFIG_ID": "bench/app", "SCONIFY_SESSION_FILE": "/run/session.yml",
               "SCONIFY_EXECUTABLE": "/bin/busybox", "SCONIFY_USER": "1000:1000"}
        firsts: list[float] = []
        nexts: list[float] = []
        for i in range(args.repeat):
            root = base / f"root{i}"
            result = protect_directory(base / "src", root, regions, key, metadata_path=METADATA)
            session = {"name": "bench", "version": "0.3", "services": [{
                "name": "app", "mrenclaves": [mrenclave], "command": "/bin/true", "environment": {"PATH": "/bin"},
                "pwd": "/", "fspf_path": METADATA, "fspf_key": key.hex(), "fspf_tag": result.tag.hex()}]}
            (root / "run/session.yml").write_text(json.dumps(session))
            subprocess.run(["sync"], check=True)
            for times in (firsts, nexts):  # the first start decrypts, the next one verifies the plaintext
                start = time.perf_counter()
                run_start(root, env)
                times.append(time.perf_counter() - start)
        total = encrypted + authenticated
        label = (f"{format_size(encrypted)} encrypted + {format_size(authenticated)} authenticated in "
                 f"{args.files + 2} files")
        print(f"first start, {label}: {min(firsts):.3f} s ({total / min(firsts) / 1e6:.0f} MB/s, decrypts)")
        print(f"next start, {label}: {min(nexts):.3f} s ({total / min(nexts) / 1e6:.0f} MB/s, verifies)")


if __name__ == "__main__":
    main()
