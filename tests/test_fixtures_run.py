"""Fixture images really run: unpacked by umoci and started in a chroot with their config's argv, user,
environment and working directory, and (when the test engine starts here) under ``docker run``. The edge
cases fail the way the catalogue says they do."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from fixture_images import FixtureImages, fixture_image_fixture
from infra.images import to_docker_archive

from fixtures import BuildResult

fixture_image = fixture_image_fixture()

RUNNABLE = ["busybox-sh", "dynamic-c", "python-app", "distroless", "entry-two-symlinks", "multi-entry-cmd",
            "shell-form", "wrapper-exec", "setuid", "secret-env"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot and owner-preserving unpack need root")


@pytest.fixture(scope="module")
def rootfs(fixture_image: FixtureImages, tmp_path_factory: pytest.TempPathFactory):
    """``rootfs(name)``: the image unpacked by umoci with its owners (as root), once per module."""
    done: dict[str, Path] = {}

    def get(name: str, **params: object) -> Path:
        key = name + repr(sorted(params.items()))
        if key not in done:
            result = fixture_image(name, **params)
            bundle = tmp_path_factory.mktemp("bundle") / name
            run = subprocess.run(["umoci", "unpack", "--image", f"{result.layout}:{result.tag}", str(bundle)],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            done[key] = bundle / "rootfs"
        return done[key]

    return get


def _passwd(root: Path) -> dict[str, tuple[int, int, str]]:
    users = {}
    for line in (root / "etc" / "passwd").read_text().splitlines():
        name, _, uid, gid, _, home, _ = line.split(":")
        users[name] = (int(uid), int(gid), home)
        users[uid] = users[name]
    return users


def run_like_docker(result: BuildResult, root: Path, extra_env: dict[str, str] | None = None,
                    ) -> subprocess.CompletedProcess[str]:
    """Run the image's Entrypoint + Cmd in a chroot of ``root`` with its Env, WorkingDir and User, and HOME
    from /etc/passwd, as ``docker run`` would (without namespaces)."""
    config = result.open().config["config"]
    argv = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
    user = config.get("User") or "root"
    name, _, group = user.partition(":")
    users = _passwd(root)
    uid, gid, home = users.get(name, (int(name) if name.isdigit() else 0, 0, "/"))
    gid = int(group) if group else gid
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    env.setdefault("HOME", home)
    env.update(extra_env or {})
    workdir = config.get("WorkingDir") or "/"

    def enter() -> None:
        os.chroot(root)
        os.chdir(workdir)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return subprocess.run(argv, env=env, preexec_fn=enter, capture_output=True, text=True, timeout=60)


@needs_root
@pytest.mark.parametrize("name", RUNNABLE)
def test_image_runs_its_command(name: str, fixture_image: FixtureImages, rootfs) -> None:
    result = fixture_image(name)
    ran = run_like_docker(result, rootfs(name))
    assert ran.returncode == result.facts["exit_code"], ran.stderr
    lines = ran.stdout.splitlines()
    for expected in result.facts["stdout"]:
        assert expected in lines, (expected, ran.stdout)


@needs_root
def test_busybox_sh_exit_code_is_chosen(fixture_image: FixtureImages, rootfs) -> None:
    seven = fixture_image("busybox-sh", exit_code=7)
    assert run_like_docker(seven, rootfs("busybox-sh", exit_code=7)).returncode == 7
    plain = fixture_image("busybox-sh")
    assert run_like_docker(plain, rootfs("busybox-sh"), {"EXIT_CODE": "3"}).returncode == 3


@needs_root
def test_python_app_runs_under_the_image_python(fixture_image: FixtureImages, rootfs) -> None:
    ran = run_like_docker(fixture_image("python-app"), rootfs("python-app"))
    assert "python-app: python=3.11." in ran.stdout


@needs_root
def test_dynamic_c_runs_as_its_user(fixture_image: FixtureImages, rootfs) -> None:
    ran = run_like_docker(fixture_image("dynamic-c"), rootfs("dynamic-c"))
    assert "hello: HOME=/home/app" in ran.stdout.splitlines()
    assert "hello: uid=1000 gid=1000" in ran.stdout.splitlines()


@needs_root
def test_missing_lib_fails_in_the_loader(fixture_image: FixtureImages, rootfs) -> None:
    ran = run_like_docker(fixture_image("missing-lib"), rootfs("missing-lib"))
    assert ran.returncode == 127
    assert "libsconify_missing.so.1" in ran.stderr


@needs_root
def test_env_shebang_with_an_argument_fails_under_busybox_env(fixture_image: FixtureImages, rootfs) -> None:
    ran = run_like_docker(fixture_image("env-shebang"), rootfs("env-shebang"))
    assert ran.returncode != 0
    assert "python3 -u" in ran.stderr


@needs_root
def test_symlink_loop_cannot_be_executed(fixture_image: FixtureImages, rootfs) -> None:
    with pytest.raises(OSError) as err:
        run_like_docker(fixture_image("symlink-loop"), rootfs("symlink-loop"))
    assert err.value.errno == errno.ELOOP


@needs_root
def test_aarch64_entry_is_not_an_x86_program(fixture_image: FixtureImages, rootfs, tmp_path: Path) -> None:
    if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("this machine runs aarch64 programs through qemu")
    result = fixture_image("aarch64")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{result.layout}:{result.tag}", str(bundle)], check=True,
                   capture_output=True, timeout=120)
    with pytest.raises(OSError) as err:
        subprocess.run([str(bundle / "rootfs" / "app" / "hello")], capture_output=True, timeout=10)
    assert err.value.errno == errno.ENOEXEC


DOCKER_RUNNABLE = ["busybox-sh", "dynamic-c", "python-app", "distroless", "multi-entry-cmd", "shell-form",
                   "wrapper-exec"]


@pytest.fixture(scope="module")
def loaded(dockerd, fixture_image: FixtureImages, tmp_path_factory: pytest.TempPathFactory):
    """``loaded(name)``: the fixture loaded into the test engine as ``sconify-fixture/NAME:latest``."""
    done: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in done:
            tag = f"sconify-fixture/{name}:latest"
            archive = to_docker_archive(fixture_image(name).reference,
                                        tmp_path_factory.mktemp("docker-archive") / f"{name}.tar", tag)
            dockerd.load(archive)
            done[name] = tag
        return done[name]

    return get


@pytest.mark.parametrize("name", DOCKER_RUNNABLE)
def test_image_runs_under_docker(name: str, fixture_image: FixtureImages, dockerd, loaded) -> None:
    result = fixture_image(name)
    ran = dockerd.run_container(loaded(name))
    assert ran.returncode == result.facts["exit_code"], ran.stderr
    lines = ran.stdout.splitlines()
    for expected in result.facts["stdout"]:
        assert expected in lines, (expected, ran.stdout)


def test_missing_lib_fails_under_docker(dockerd, loaded) -> None:
    ran = dockerd.run_container(loaded("missing-lib"))
    assert ran.returncode == 127
    assert "libsconify_missing.so.1" in ran.stderr
