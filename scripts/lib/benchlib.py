"""Shared by the benchmarks: run a command in a child process and measure its wall time, CPU and peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    """One timed child process: wall seconds, CPU seconds (user + system), peak RSS in MiB."""

    seconds: float
    cpu: float
    peak_mib: float


# A small launcher times and measures each copy: Linux keeps a process's peak RSS across fork and exec, so a
# child forked straight from this (big) process would report at least this process's RSS as its own.
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime,
                  "peak_kib": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}))
"""


def timed(cmd: list[str]) -> Run:
    """Run ``cmd`` to the end through the launcher: its wall time, CPU time and own peak RSS."""
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    try:
        got = json.loads(proc.stdout)
    except ValueError:
        got = {"code": proc.returncode}
    if proc.returncode != 0 or got["code"] != 0:
        raise SystemExit(f"benchmark command failed ({got['code']}): {' '.join(cmd)}\n{proc.stderr}")
    return Run(got["seconds"], got["cpu"], got["peak_kib"] / 1024)
