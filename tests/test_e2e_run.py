"""Converted fixture images really run under the Docker engine (simulation mode) as their native images do, keep
their protected files as ciphertext at rest, and hand signals and exit codes straight to the application.

Each fixture image is loaded twice into the test engine: as built (copied to a docker-archive as ``sconify copy``
does) and as ``sconify convert`` wrote it into a docker-archive. Both run with ``--network=none``; the converted
one with its session mounted read-only at /run/sconify/session.yml.
"""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import tarfile
import time
from pathlib import Path

import pytest
from e2e_support import (
    Pair,
    image_config,
    loaded_conversion,
    loaded_pair,
    run_converted,
    session_options,
)
from infra.dockerd import DockerEngine
from test_convert_support import Keys, keys  # noqa: F401 (keys is a fixture)
from test_runtime_support import runtime_binary  # noqa: F401 (a fixture: builds the launcher when it is stale)

FIXTURES = ("busybox-sh", "python-app", "dynamic-c")

pytestmark = pytest.mark.usefixtures("runtime_binary")


@pytest.fixture(params=FIXTURES)
def pair(request: pytest.FixtureRequest, dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory,
         fixture_image, keys: Keys) -> Pair:  # noqa: F811
    return loaded_pair(dockerd, tmp_path_factory, fixture_image, keys, request.param)


def test_the_converted_image_behaves_like_the_native_one(dockerd: DockerEngine, pair: Pair) -> None:
    native = dockerd.run_container(pair.native)
    converted = run_converted(dockerd, pair.converted, pair.policy)
    facts = pair.source.facts
    assert native.returncode == facts["exit_code"], native.stderr
    for line in facts["stdout"]:  # the native run shows what the fixture is built to show
        assert line in native.stdout.splitlines(), (line, native.stdout)
    assert (converted.returncode, converted.stdout, converted.stderr) == (
        native.returncode, native.stdout, native.stderr)


def test_the_launcher_in_the_image_measures_what_the_converter_measured(dockerd: DockerEngine, pair: Pair) -> None:
    # `--measure` as the only host argument is the launcher's: it prints the MRENCLAVE and needs no session.
    done = dockerd.run_container(pair.converted, "--measure")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() == pair.conversion.service["mrenclaves"][0].lower()


def test_the_non_root_image_runs_as_its_user(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory,
                                             fixture_image, keys: Keys) -> None:  # noqa: F811
    pair = loaded_pair(dockerd, tmp_path_factory, fixture_image, keys, "dynamic-c")
    assert image_config(dockerd, pair.native)["User"] == pair.source.facts["user"] == "1000:1000"
    # The converted image starts as root, so that the launcher can prepare the files, then becomes the user.
    assert image_config(dockerd, pair.converted)["User"] in ("0:0", "")
    converted = run_converted(dockerd, pair.converted, pair.policy)
    assert "hello: uid=1000 gid=1000" in converted.stdout.splitlines(), converted.stderr
    assert "hello: HOME=/home/app" in converted.stdout.splitlines()


# Lists every path under the application's directories with type, mode, owner, size, mtime and, for files the
# user can read, a hash of the content.
LISTING = ("cd / && /bin/busybox find /app /home/app | /bin/busybox sort | while read -r p; do "
           "/bin/busybox stat -c '%n %F %a %u:%g %s %Y' \"$p\"; "
           "if [ -f \"$p\" ] && [ -r \"$p\" ]; then /bin/busybox md5sum \"$p\"; fi; done")


def test_protected_files_come_back_with_their_owner_mode_mtime_and_content(
        dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image, keys: Keys) -> None:  # noqa: F811
    source = fixture_image("dynamic-c")
    pair = loaded_pair(dockerd, tmp_path_factory, fixture_image, keys, "dynamic-c")
    conversion, image = loaded_conversion(dockerd, tmp_path_factory, source, keys, "listing",
                                          command=("/bin/sh", "-c", LISTING))
    native = dockerd.run_container(pair.native, "-c", LISTING, options=("--entrypoint", "/bin/sh"))
    converted = run_converted(dockerd, image, conversion.policy)
    assert native.returncode == 0, native.stderr
    assert " 1000:1000 " in native.stdout and "regular file" in native.stdout
    assert (converted.returncode, converted.stdout, converted.stderr) == (0, native.stdout, native.stderr)


def test_the_exit_code_comes_back(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image,
                                  keys: Keys) -> None:  # noqa: F811
    seven = loaded_pair(dockerd, tmp_path_factory, fixture_image, keys, "busybox-sh", exit_code=7)
    native = dockerd.run_container(seven.native)
    converted = run_converted(dockerd, seven.converted, seven.policy)
    assert native.returncode == 7
    assert (converted.returncode, converted.stdout) == (7, native.stdout)


def test_the_host_cannot_change_the_application_environment(dockerd: DockerEngine,
                                                            tmp_path_factory: pytest.TempPathFactory, fixture_image,
                                                            keys: Keys) -> None:  # noqa: F811
    # run.sh exits with $EXIT_CODE when it is set: the native image takes it from `docker run -e`, the converted
    # one only from its session.
    pair = loaded_pair(dockerd, tmp_path_factory, fixture_image, keys, "busybox-sh")
    native = dockerd.run_container(pair.native, options=("-e", "EXIT_CODE=3"))
    converted = run_converted(dockerd, pair.converted, pair.policy, options=("-e", "EXIT_CODE=3"))
    assert native.returncode == 3
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout == native.stdout


# -- at rest: ciphertext in the image and in a container's file system ---------------------------------------


def _members(archive: Path) -> list[bytes]:
    """The contents of every regular member of a tar, gunzipped where compressed; nested tars (the layers of
    ``docker save``) are returned whole, which is enough for a substring search of uncompressed layers."""
    contents = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            stream = tar.extractfile(member)
            assert stream is not None
            data = stream.read()
            contents.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return contents


def _regions(pair: Pair) -> dict[str, str]:
    return {r["path"]: r["mode"] for r in pair.conversion.result.report["regions"]}


def _mode(regions: dict[str, str], path: str) -> str:
    best = max((r for r in regions if r == "/" or path == r or path.startswith(r + "/")), key=len)
    return regions[best]


def _found(contents: list[bytes], values: list[str]) -> set[str]:
    return {v for v in values if any(v.encode() in data for data in contents)}


def test_docker_export_shows_no_plaintext_of_an_encrypted_file(dockerd: DockerEngine, pair: Pair,
                                                                tmp_path: Path) -> None:
    regions = _regions(pair)
    encrypted = [m.value for m in pair.source.markers
                 if m.visible and not m.location.startswith("config:") and _mode(regions, m.location) == "encrypted"]
    assert encrypted, f"{pair.name} has no marker in an encrypted file"
    exported = {}
    for kind, image in (("native", pair.native), ("converted", pair.converted)):
        # A container that was created but never started: what an image gives to whoever can read the node's disk.
        container = dockerd.run("create", "--network=none", image, check=True).stdout.strip()
        try:
            dockerd.run("export", "-o", str(tmp_path / f"{kind}.tar"), container, check=True)
        finally:
            dockerd.run("rm", "-f", container)
        exported[kind] = _members(tmp_path / f"{kind}.tar")
    assert _found(exported["native"], encrypted) == set(encrypted)  # the search would see them
    assert _found(exported["converted"], encrypted) == set()


def test_docker_save_shows_no_marker_of_an_encrypted_file_nor_a_secret_variable(dockerd: DockerEngine, pair: Pair,
                                                                                 tmp_path: Path) -> None:
    regions = _regions(pair)
    secret = [m.value for m in pair.source.markers
              if m.location.startswith("config:") or _mode(regions, m.location) == "encrypted"]
    dockerd.run("save", "-o", str(tmp_path / "native.tar"), pair.native, check=True)
    dockerd.run("save", "-o", str(tmp_path / "converted.tar"), pair.converted, check=True)
    # Hidden copies (under whiteouts) and the config's Env are in the native save, and in no blob of the converted.
    assert _found(_members(tmp_path / "native.tar"), secret) == set(secret)
    assert _found(_members(tmp_path / "converted.tar"), secret) == set()


# -- signals --------------------------------------------------------------------------------------------------

# A loop of short foreground sleeps: ash runs the trap when the current one ends (its `wait` can miss a signal
# that arrives just before it blocks). A plain `sleep` would not do: as PID 1 of its container it has no handler,
# and the kernel drops SIGTERM for it, so `docker stop` would end it only with SIGKILL after the grace period.
TRAP = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done"


def _logs(dockerd: DockerEngine, container: str) -> str:
    return dockerd.run("logs", container, check=True).stdout


def test_docker_stop_reaches_the_application(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory,
                                             fixture_image, keys: Keys) -> None:  # noqa: F811
    conversion, image = loaded_conversion(dockerd, tmp_path_factory, fixture_image("busybox-sh"), keys, "trap",
                                          command=("/bin/sh", "-c", TRAP))
    started = dockerd.run("run", "-d", "--network=none", *session_options(conversion.policy), image, check=True)
    container = started.stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while "ready" not in _logs(dockerd, container):
            state = json.loads(dockerd.run("inspect", container, check=True).stdout)[0]["State"]
            assert state["Running"] and time.monotonic() < deadline, (state, _logs(dockerd, container))
            time.sleep(0.1)
        # The container's first process is the application itself: the launcher exec'd it, nothing stands between.
        pid = json.loads(dockerd.run("inspect", container, check=True).stdout)[0]["State"]["Pid"]
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"\0".join([b"/bin/sh", b"-c", TRAP.encode(), b""])
        # A grace period far longer than the test: had SIGTERM not reached the trap, the status would be 137.
        dockerd.run("stop", "-t", "60", container, check=True, timeout=90)
        state = json.loads(dockerd.run("inspect", container, check=True).stdout)[0]["State"]
        assert state["ExitCode"] == 42, (state, _logs(dockerd, container))
        assert _logs(dockerd, container) == "ready\ngot TERM\n"
    finally:
        dockerd.run("rm", "-f", container)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (host PIDs), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(shutil.which("docker-init") is None, reason="docker-init (tini) is missing; install tini")
def test_docker_stop_ends_a_plain_sleep_under_an_init(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory,
                                                      fixture_image, keys: Keys) -> None:  # noqa: F811
    # A program without a signal handler ends on SIGTERM once it is not PID 1: with `docker run --init` the
    # launcher, then the program it becomes, runs under tini, which passes the signal on.
    conversion, image = loaded_conversion(dockerd, tmp_path_factory, fixture_image("busybox-sh"), keys, "sleep",
                                          command=("/bin/sleep", "30"))
    started = dockerd.run("run", "-d", "--init", "--network=none", *session_options(conversion.policy), image,
                          check=True)
    container = started.stdout.strip()
    try:
        init = json.loads(dockerd.run("inspect", container, check=True).stdout)[0]["State"]["Pid"]
        deadline = time.monotonic() + 30
        while not any(Path(f"/proc/{child}/cmdline").read_bytes() == b"/bin/sleep\x0030\x00"
                      for child in _children(init)):
            assert time.monotonic() < deadline, _logs(dockerd, container)
            time.sleep(0.05)
        dockerd.run("stop", "-t", "60", container, check=True, timeout=90)
        state = json.loads(dockerd.run("inspect", container, check=True).stdout)[0]["State"]
        assert state["ExitCode"] == 128 + signal.SIGTERM, (state, _logs(dockerd, container))  # not 137 (SIGKILL)
    finally:
        dockerd.run("rm", "-f", container)
