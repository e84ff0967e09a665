"""The Docker engine fixture works: a private engine loads skopeo's archives, pulls from the test
registry and runs busybox containers without a network; a stopped engine leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from infra.dockerd import MARKER, ROOT_PREFIX, DockerdStartError, DockerEngine, start_dockerd, sweep_stale_roots
from infra.images import skopeo, to_docker_archive
from infra.registry import Registry


@pytest.fixture(scope="module")
def loaded_busybox(dockerd: DockerEngine, busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox test image, loaded into the engine from a skopeo docker-archive as ``sconify-test/bb:1``."""
    archive = to_docker_archive(busybox_image, tmp_path_factory.mktemp("archive") / "bb.tar", "sconify-test/bb:1")
    loaded = dockerd.load(archive)
    assert "sconify-test/bb:1" in loaded.stdout
    return "sconify-test/bb:1"


def test_engine_is_private_and_answers(dockerd: DockerEngine) -> None:
    assert dockerd.host.startswith("unix:///tmp/")
    assert len(str(dockerd.socket).encode()) < 108  # the kernel's limit for unix socket paths
    assert dockerd.env["DOCKER_HOST"] == dockerd.host
    info = dockerd.run("info", "--format", "{{.Driver}} {{.DockerRootDir}}", check=True).stdout.split()
    assert info == ["vfs", str(dockerd.root / "root")]


def test_loaded_image_runs_its_cmd(dockerd: DockerEngine, loaded_busybox: str) -> None:
    ran = dockerd.run_container(loaded_busybox)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello from busybox\n"


def test_container_sees_the_image_files_and_no_network(dockerd: DockerEngine, loaded_busybox: str) -> None:
    ran = dockerd.run_container(loaded_busybox, "sh", "-c", "cat /etc/motd; ls /sys/class/net")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["sconify test image", "lo"]


def test_container_exit_code_reaches_the_caller(dockerd: DockerEngine, loaded_busybox: str) -> None:
    assert dockerd.run_container(loaded_busybox, "sh", "-c", "exit 3").returncode == 3


def test_engine_pulls_from_the_test_registry(
    dockerd: DockerEngine, registry: Registry, busybox_image: str, repository_name: str
) -> None:
    skopeo("copy", "--dest-tls-verify=false", busybox_image, registry.ref(repository_name, "pulled"))
    # Docker treats 127.0.0.0/8 registries as insecure (plain HTTP) without extra configuration.
    reference = f"{registry.host}/{repository_name}:pulled"
    pulled = dockerd.run("pull", reference)
    assert pulled.returncode == 0, pulled.stderr
    ran = dockerd.run_container(reference, "echo", "pulled")
    assert ran.stdout == "pulled\n"


def test_stopped_engine_leaves_no_process_mount_or_files(dockerd: DockerEngine) -> None:
    # A second engine beside the session one, so that stopping it can be watched.
    try:
        engine = start_dockerd()
    except DockerdStartError as err:
        pytest.skip(str(err))
    assert engine._proc is not None
    pids = [engine._proc.pid, int((engine.root / "exec" / "containerd" / "containerd.pid").read_text())]
    assert engine.alive()
    engine.stop()
    assert not engine.alive()
    assert not engine.root.exists()
    assert str(engine.root) not in Path("/proc/self/mountinfo").read_text()
    assert all(_gone(pid) for pid in pids)
    assert dockerd.alive()  # the session engine did not notice


def _gone(pid: int) -> bool:
    """True if the process no longer exists or is only a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sweep_removes_only_stale_roots_of_dead_engines(tmp_path: Path) -> None:
    def root(name: str, marker: bool, pid: int | None, age: float) -> Path:
        path = tmp_path / f"{ROOT_PREFIX}{name}"
        path.mkdir()
        if marker:
            (path / MARKER).write_text("")
        if pid is not None:
            (path / "docker.pid").write_text(str(pid))
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
        return path

    dead_pid = _finished_pid()
    stale = root("stale", marker=True, pid=dead_pid, age=3600)
    alive = root("alive", marker=True, pid=os.getpid(), age=3600)
    young = root("young", marker=True, pid=None, age=0)
    foreign = root("foreign", marker=False, pid=None, age=3600)

    assert sweep_stale_roots(str(tmp_path)) == [stale]
    assert not stale.exists()
    assert alive.exists() and young.exists() and foreign.exists()


def _finished_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
