"""Process plumbing shared by the fixtures: free ports, bounded waits, polite stops and log tails."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when pytest dies, so that a killed test
    run leaves no registry or engine behind. Only a libc call, safe between fork and exec."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the caller may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    ready: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None, step: float = 0.05
) -> bool:
    """Poll ``ready`` until it is true or ``timeout`` seconds pass; stop early if ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
        step = min(step * 1.5, 0.5)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process: SIGTERM, wait up to ``grace`` seconds, then SIGKILL and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def kill_pid_from_file(pidfile: Path, marker: str, grace: float = 5.0) -> None:
    """Stop the process named in ``pidfile`` if it is alive and its command line holds ``marker``.

    The marker (a path only our process uses) guards against a pid the kernel has since reused.
    """
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return
    if marker not in cmdline:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def clean_env(drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    """A copy of the environment without variables that start with any of ``drop_prefixes``."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
