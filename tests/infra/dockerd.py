"""A private Docker engine (Debian's ``dockerd``) on a unix socket in a temp dir, for tests.

vfs storage, no bridge, no iptables, no TCP listener; containers always run with ``--network=none``.
It shares nothing with a system engine: own socket, data root, exec root, pidfile, daemon.json and
CLI config directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import clean_env, die_with_parent, kill_pid_from_file, log_tail, stop_process, wait_until

DOCKERD_BIN = "dockerd"
START_TIMEOUT = 30.0
STOP_GRACE = 15.0
ROOT_PREFIX = "sd-"
MARKER = "sconify-test-engine"  # a file that says a temp dir is ours to sweep
STALE_AFTER = 600.0  # seconds; a live engine keeps its pidfile, so age alone never removes it


class DockerdStartError(RuntimeError):
    """The engine could not be started here; the message says why (and shows its log tail)."""


@dataclass
class DockerEngine:
    """A running engine: ``host`` is ``unix://.../docker.sock``, ``env`` points the docker CLI at it."""

    root: Path
    docker: str
    log_path: Path
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a docker client (CLI, SDK, skopeo's docker-daemon:) that uses this engine."""
        env = clean_env(("DOCKER_",))
        env["DOCKER_HOST"] = self.host
        # A private CLI config: no credential helpers or contexts from the machine's ~/.docker.
        env["DOCKER_CONFIG"] = str(self.root / "cli")
        return env

    def run(self, *args: str, check: bool = False, timeout: float = 120, input: bytes | None = None,
            ) -> subprocess.CompletedProcess:
        """Run ``docker ARGS...`` against this engine; stdout/stderr are captured as text."""
        return subprocess.run(
            [self.docker, *args], env=self.env, capture_output=True, timeout=timeout, check=check,
            input=input, text=input is None,
        )

    def run_container(self, image: str, *args: str, check: bool = False, timeout: float = 60,
                      options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """``docker run --rm --network=none [options] IMAGE ARGS...``: containers never get a network."""
        return self.run("run", "--rm", "--network=none", *options, image, *args, check=check, timeout=timeout)

    def load(self, archive: Path) -> subprocess.CompletedProcess:
        """``docker load -i ARCHIVE``, raising CalledProcessError on failure."""
        return self.run("load", "-i", str(archive), check=True)

    def version(self) -> dict:
        """The engine's ``docker version`` answer as JSON."""
        out = self.run("version", "--format", "{{json .}}", check=True)
        return json.loads(out.stdout)

    def alive(self) -> bool:
        """True while the engine process runs and answers."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        return self._answers()

    def log(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            out = self.run("version", "--format", "{{.Server.Version}}", timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and bool(out.stdout.strip())

    def stop(self) -> None:
        """Stop the engine (SIGTERM, wait, SIGKILL), its containerd, unmount leftovers, remove the root."""
        if self._proc is not None:
            stop_process(self._proc, grace=STOP_GRACE)
            self._proc = None
        # dockerd normally stops the containerd it started; if dockerd was killed, containerd is left.
        kill_pid_from_file(self.root / "exec" / "containerd" / "containerd.pid", marker=str(self.root))
        unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def unmount_below(root: Path) -> None:
    """Lazily unmount every mount point at or below ``root``, deepest first."""
    prefix = str(root.resolve())
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and such escaped as octal.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def sweep_stale_roots(base: str = "/tmp") -> list[Path]:
    """Remove engine roots left by killed test runs: ours (marker file), old, no live dockerd, no mounts."""
    removed = []
    mounts = Path("/proc/self/mountinfo").read_text()
    now = time.time()
    for root in Path(base).glob(ROOT_PREFIX + "*"):
        if not (root / MARKER).is_file() or now - root.stat().st_mtime < STALE_AFTER:
            continue
        try:
            pid = int((root / "docker.pid").read_text().strip())
            if Path(f"/proc/{pid}").exists():
                continue
        except (FileNotFoundError, ValueError):
            pass
        if f" {root}/" in mounts or f" {root} " in mounts:
            continue
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


def start_dockerd(base: str | None = None) -> DockerEngine:
    """Start a private engine under a new short temp dir and wait until ``docker version`` answers.

    Raises DockerdStartError when it cannot run here (not root, binary missing, start failure).
    """
    dockerd = shutil.which(DOCKERD_BIN)
    docker = shutil.which("docker")
    if dockerd is None or docker is None:
        raise DockerdStartError("dockerd or the docker CLI is missing; install the Debian package docker.io.")
    if os.geteuid() != 0:
        raise DockerdStartError("dockerd needs root here (no rootless set-up); run the tests as root.")
    # Unix socket paths are limited to 108 bytes and containerd nests its sockets under exec-root,
    # so the root is a short dir directly in /tmp rather than pytest's deeper tmp_path.
    sweep_stale_roots(base or "/tmp")
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=base or "/tmp"))
    (root / MARKER).write_text("a private dockerd of sconify's tests; removed when the run ends\n")
    (root / "cli").mkdir()
    daemon_json = root / "daemon.json"
    daemon_json.write_text("{}\n")  # never pick up the machine's /etc/docker/daemon.json
    log_path = root / "dockerd.log"
    cmd = [
        dockerd,
        "--config-file", str(daemon_json),
        "--storage-driver=vfs",
        "--bridge=none",
        "--iptables=false",
        "--ip-masq=false",
        "--ip6tables=false",
        "--host", f"unix://{root / 'docker.sock'}",
        "--data-root", str(root / "root"),
        "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "docker.pid"),
    ]
    engine = DockerEngine(root=root, docker=docker, log_path=log_path)
    with open(log_path, "ab") as log:
        engine._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=clean_env(("DOCKER_",)), start_new_session=True, preexec_fn=die_with_parent,
        )
    if wait_until(engine._answers, START_TIMEOUT, engine._proc, step=0.2):
        return engine
    tail = engine.log()
    engine.stop()
    raise DockerdStartError(f"dockerd did not answer within {START_TIMEOUT:.0f} s; log tail:\n{tail}")
