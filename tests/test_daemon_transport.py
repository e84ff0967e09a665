"""The docker-daemon: transport against a real engine: images go in (tagged, runnable) and come back out
unchanged; a missing image, a missing engine and a nameless destination are refused clearly; nothing imports
the Docker SDK unless a docker-daemon: reference is used."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from infra.dockerd import DockerEngine
from infra.images import skopeo, to_docker_archive, umoci

from sconify.errors import BadReferenceError, NetworkError, NotFoundError
from sconify.image.copy import CopyResult, write_image
from sconify.image.reference import parse_reference
from sconify.image.transports import TransportOptions, open_destination, open_image

SCONIFY = [sys.executable, "-m", "sconify"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SCONIFY, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def copy(src: str, dst: str, host: str) -> CopyResult:
    options = TransportOptions(daemon_host=host)
    return write_image(open_image(parse_reference(src), None, options),
                       open_destination(parse_reference(dst), options))


def image_id(dockerd: DockerEngine, name: str) -> str:
    return dockerd.run("inspect", "--format", "{{.Id}}", name, check=True).stdout.strip()


def test_oci_into_the_daemon_runs_and_comes_back_unchanged(
    dockerd: DockerEngine, busybox_image: str, tmp_path: Path
) -> None:
    source = open_image(parse_reference(busybox_image))
    result = copy(busybox_image, "docker-daemon:sconify-test/daemon-in:1", dockerd.host)
    assert result.destination == "docker-daemon:sconify-test/daemon-in:1"
    assert image_id(dockerd, "sconify-test/daemon-in:1") == source.config_descriptor.digest
    ran = dockerd.run_container("sconify-test/daemon-in:1")
    assert ran.stdout == "hello from busybox\n", ran.stderr

    back = copy("docker-daemon:sconify-test/daemon-in:1", f"oci:{tmp_path}/back:t", dockerd.host)
    copied = open_image(parse_reference(f"oci:{tmp_path}/back:t"))
    assert copied.config_bytes == source.config_bytes
    assert [la.diff_id for la in copied.layers] == [la.diff_id for la in source.layers]
    umoci("unpack", "--rootless", "--image", f"{tmp_path}/back:t", str(tmp_path / "bundle"))
    assert (tmp_path / "bundle/rootfs/etc/motd").read_text() == "sconify test image\n"
    # The engine gives the same archive each time, so the read is deterministic.
    again = copy("docker-daemon:sconify-test/daemon-in:1", f"oci:{tmp_path}/again:t", dockerd.host)
    assert again.digest == back.digest


def test_reads_an_image_docker_loaded_itself(dockerd: DockerEngine, busybox_image: str, tmp_path: Path) -> None:
    dockerd.load(to_docker_archive(busybox_image, tmp_path / "bb.tar", "sconify-test/loaded:2"))
    options = TransportOptions(daemon_host=dockerd.host)
    image = open_image(parse_reference("docker-daemon:sconify-test/loaded:2"), None, options)
    assert image.config_descriptor.digest == image_id(dockerd, "sconify-test/loaded:2")
    by_id = open_image(parse_reference(f"docker-daemon:{image.config_descriptor.digest}"), None, options)
    assert by_id.digest == image.digest
    for layer in image.layers:
        with layer.open_tar() as tar:
            while tar.read(1 << 20):
                pass


def test_writing_a_tag_again_moves_it(dockerd: DockerEngine, busybox_image: str, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    skopeo("copy", busybox_image, f"oci:{layout}:a")
    umoci("config", "--image", f"{layout}:a", "--tag", "b", "--config.cmd", "echo", "--config.cmd", "second")
    copy(f"oci:{layout}:a", "docker-daemon:sconify-test/moving:1", dockerd.host)
    copy(f"oci:{layout}:b", "docker-daemon:sconify-test/moving:1", dockerd.host)
    assert dockerd.run_container("sconify-test/moving:1").stdout == "second\n"


def test_missing_image_exits_4_with_one_line(dockerd: DockerEngine, tmp_path: Path) -> None:
    proc = run_cli("copy", "docker-daemon:sconify-test/absent:1", f"oci:{tmp_path}/x:t", env=dockerd.env)
    assert proc.returncode == NotFoundError.exit_code, proc.stderr
    assert proc.stderr.splitlines() == [
        f"sconify: error: image sconify-test/absent:1 is not in the Docker daemon at {dockerd.host}; "
        "pull, load or build it first."
    ]
    assert not (tmp_path / "x").exists()


@pytest.fixture
def dead_socket(tmp_path: Path):
    """A unix socket that exists but where nobody accepts connections."""
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # bound, never listening: connect() is refused
    yield f"unix://{path}"
    sock.close()


@pytest.mark.parametrize("where", ["missing", "refusing"])
def test_daemon_down_exits_6_with_one_line(busybox_image, tmp_path, dead_socket, where):
    host = f"unix://{tmp_path}/no-engine.sock" if where == "missing" else dead_socket
    env = {"DOCKER_HOST": host}
    for args in (("copy", busybox_image, "docker-daemon:sconify-test/x:1"),
                 ("copy", "docker-daemon:sconify-test/x:1", f"oci:{tmp_path}/out:t"),
                 ("inspect", "docker-daemon:busybox")):
        proc = run_cli(*args, env=env)
        assert proc.returncode == NetworkError.exit_code, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert lines[0].startswith(f"sconify: error: the Docker daemon at {host} is not reachable")
        assert "start dockerd or set DOCKER_HOST" in lines[0]
    assert not (tmp_path / "out").exists()


def test_destination_needs_a_name(tmp_path):
    digest = "sha256:" + "ab" * 32
    with pytest.raises(BadReferenceError, match="needs a name"):
        open_destination(parse_reference(f"docker-daemon:{digest}"),
                         TransportOptions(daemon_host=f"unix://{tmp_path}/none.sock"))


def test_other_transports_never_import_the_docker_sdk(busybox_image, tmp_path):
    script = f"""
import sys
from sconify.image.copy import write_image
from sconify.image.reference import parse_reference
from sconify.image.transports import open_destination, open_image
for src, dst in [({busybox_image!r}, "docker-archive:{tmp_path}/a.tar:x/y:1"),
                 ("docker-archive:{tmp_path}/a.tar", "oci-archive:{tmp_path}/b.tar:t")]:
    write_image(open_image(parse_reference(src)), open_destination(parse_reference(dst)))
print(sorted(m for m in sys.modules if m == "docker" or m.startswith("docker.") or m == "python_on_whales"))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(proc.stdout.replace("'", '"')) == []
