"""The launcher execs the application: signals sent to the container's process reach it, and its status comes back."""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_runtime_support import (  # noqa: F401 (runtime_binary is a fixture)
    ProtectedRoot,
    chroot_command,
    make_source_tree,
    protect_tree,
    require_chroot,
    runtime_binary,
    service,
    write_session,
)

# A loop of short foreground sleeps: ash runs the trap when the current one ends. (Its `wait` builtin can
# miss a signal that arrives just before it blocks, which would hang the test.)
TRAP = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, runtime_binary: Path) -> ProtectedRoot:  # noqa: F811
    require_chroot()
    base = tmp_path_factory.mktemp("runtime-signals")
    return protect_tree(make_source_tree(base, runtime_binary), base / "root", runtime_binary)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_for_exec(pid: int, exe: Path, cmdline: bytes, timeout: float = 30) -> None:
    """Wait until process ``pid`` runs ``exe`` with ``cmdline``: the launcher has exec'd the application."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (Path(os.readlink(f"/proc/{pid}/exe")) == exe
                    and Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never became {exe} {cmdline!r}")


def start(app: ProtectedRoot, command: str) -> subprocess.Popen[bytes]:
    write_session(app, [service(app, command=command)])
    return subprocess.Popen(chroot_command(app.root), env=app.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_reaches_the_app_and_its_exit_code_comes_back(app: ProtectedRoot) -> None:
    proc = start(app, shlex.join(["/bin/sh", "-c", TRAP]))  # as convert writes commands
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the application did not start"
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else ""
        # The application is the very process that was started: no launcher process stands between.
        assert Path(os.readlink(f"/proc/{proc.pid}/exe")) == app.root / "bin/busybox"
        assert parent_of(proc.pid) == os.getpid()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 42, err
    assert out == b"got TERM\n"


def test_a_signal_that_ends_the_app_is_its_status(app: ProtectedRoot) -> None:
    proc = start(app, "sleep 1000")
    try:
        wait_for_exec(proc.pid, app.root / "bin/busybox", b"sleep\x001000\x00")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGTERM
