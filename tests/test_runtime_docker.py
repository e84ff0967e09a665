"""sconify-run under the real Docker engine: a protected image runs with its session mounted, tampering is refused.

The image is the protected root of the chroot tests packed as one layer, with the configuration the
converter writes (docs/runtime.md): the launcher as Entrypoint, only SCONE_/SCONIFY_ variables in Env.
The full conversions of fixture images come with `sconify convert`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from infra.dockerd import DockerEngine
from infra.images import build_oci_image, to_docker_archive
from test_runtime_support import (  # noqa: F401 (runtime_binary is a fixture)
    APP_GID,
    APP_UID,
    DATA,
    EXIT_HOST_ARGS,
    EXIT_MEASUREMENT,
    EXIT_NO_SESSION,
    EXIT_PROTECTION,
    LAUNCHER_PATH,
    SESSION_PATH,
    ProtectedRoot,
    make_source_tree,
    protect_tree,
    runtime_binary,
    service,
    write_session,
)

IMAGE = "sconify-test/runtime-app:1"


@pytest.fixture(scope="module")
def image(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory,
          runtime_binary: Path) -> tuple[str, ProtectedRoot, Path]:  # noqa: F811
    """The protected application loaded into the engine, and its session file on the host."""
    base = tmp_path_factory.mktemp("runtime-docker")
    pr = protect_tree(make_source_tree(base, runtime_binary), base / "root", runtime_binary)
    env = [f"{k}={v}" for k, v in pr.env.items() if k != "SCONIFY_SESSION_FILE"]
    reference = build_oci_image(base / "layout", "app", pr.root, entrypoint=[LAUNCHER_PATH], env=env)
    dockerd.load(to_docker_archive(reference, base / "app.tar", IMAGE))
    session = write_session(pr, [service(pr)], path=base / "session.yml")
    return IMAGE, pr, session


def run(dockerd: DockerEngine, image: str, session: Path | None, *args: str, options: tuple[str, ...] = ()):
    mount = ("-v", f"{session}:{SESSION_PATH}:ro", "-e", f"SCONIFY_SESSION_FILE={SESSION_PATH}") if session else ()
    return dockerd.run_container(image, *args, options=(*mount, *options))


def test_the_image_keeps_only_the_runtimes_configuration(dockerd: DockerEngine, image) -> None:
    name, _, _ = image
    config = json.loads(dockerd.run("image", "inspect", name, check=True).stdout)[0]["Config"]
    assert config["Entrypoint"] == [LAUNCHER_PATH]
    assert all(item.startswith(("SCONE_", "SCONIFY_")) for item in config["Env"])


def test_the_protected_app_runs_in_a_container(dockerd: DockerEngine, image) -> None:
    name, _, session = image
    done = run(dockerd, name, session)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["hello from the app", f"uid={APP_UID} gid={APP_GID} groups={APP_GID}"]
    assert done.stdout.endswith(DATA.decode())


def test_without_a_session_the_container_refuses_to_start(dockerd: DockerEngine, image) -> None:
    name, _, _ = image
    done = run(dockerd, name, None)
    assert done.returncode == EXIT_NO_SESSION
    assert done.stderr.startswith("sconify-run: no session") and done.stdout == ""


def test_another_heap_at_deploy_time_is_refused(dockerd: DockerEngine, image) -> None:
    name, _, session = image
    done = run(dockerd, name, session, options=("-e", "SCONE_HEAP=128M"))
    assert done.returncode == EXIT_MEASUREMENT
    assert "measurement mismatch" in done.stderr


def test_host_arguments_are_refused(dockerd: DockerEngine, image) -> None:
    name, _, session = image
    done = run(dockerd, name, session, "--inject")
    assert done.returncode == EXIT_HOST_ARGS
    assert "--inject" in done.stderr


def test_a_layer_that_changes_one_byte_is_refused(dockerd: DockerEngine, image, tmp_path: Path) -> None:
    name, pr, session = image
    tampered = bytearray((pr.root / "app/data.txt").read_bytes())
    tampered[70000] ^= 0x01
    (tmp_path / "data.txt").write_bytes(bytes(tampered))
    container = dockerd.run("create", name, check=True).stdout.strip()
    try:
        dockerd.run("cp", str(tmp_path / "data.txt"), f"{container}:/app/data.txt", check=True)
        dockerd.run("commit", container, f"{name}-tampered", check=True)
    finally:
        dockerd.run("rm", "-f", container)
    done = run(dockerd, f"{name}-tampered", session)
    assert done.returncode == EXIT_PROTECTION
    assert "/app/data.txt" in done.stderr and "chunk 1 " in done.stderr
