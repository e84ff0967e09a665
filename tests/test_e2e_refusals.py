"""Converted fixture images refuse to start under the Docker engine when anything the session vouches for was
changed: a layer on top that changes one byte of a protected file or replaces the measured program, another enclave
setting at deploy time, a session from another conversion, no session, host arguments the session does not take.

Tampered images are built without ``docker build``: a new layer written with sconify's layer writer on top of the
converted OCI layout, copied into a docker-archive (as ``sconify copy`` does) and loaded. Each refusal is checked for
the launcher's documented exit code (docs/runtime.md section 8) and its one line on stderr.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from e2e_support import (
    EXIT_HOST_ARGS,
    EXIT_MEASUREMENT,
    EXIT_NO_SESSION,
    EXIT_PROTECTION,
    EXIT_READ_ONLY,
    EXIT_WRONG_SESSION,
    REPOSITORY,
    SESSION_PATH,
    Pair,
    add_layer,
    copy_image,
    image_env,
    loaded_conversion,
    loaded_pair,
    other_session,
    private_layout,
    run_converted,
    stored_file,
)
from infra.dockerd import DockerEngine
from test_convert_support import Converted, Keys, cached_conversion, convert_image, keys  # noqa: F401 (keys is a fixture)
from test_runtime_support import runtime_binary  # noqa: F401 (a fixture: builds the launcher when it is stale)

BUSYBOX = Path("/usr/bin/busybox")

pytestmark = pytest.mark.usefixtures("runtime_binary")


def refusal(done, code: int) -> str:  # type: ignore[no-untyped-def]
    """The launcher's refusal line, after checking the exit code, that nothing ran and that it is one line."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("sconify-run: "), done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def busybox(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image,
            keys: Keys) -> Pair:  # noqa: F811
    return loaded_pair(dockerd, tmp_path_factory, fixture_image, keys, "busybox-sh")


# -- a layer added on top ---------------------------------------------------------------------------------------


def tampered_image(dockerd: DockerEngine, conversion: Converted, base: Path, name: str,
                   changes: dict[str, bytes | None]) -> str:
    """The converted image with one layer on top that writes ``changes`` (path -> new content, or None for the
    stored content with its last byte flipped), each with the stored file's mode, owner and mtime; loaded."""
    layout = private_layout(conversion, base / "layout")
    files = []
    for path, content in changes.items():
        header, stored = stored_file(layout, path)
        if content is None:
            content = stored[:-1] + bytes([stored[-1] ^ 0x01])
        assert content != stored
        files.append((path, content, header))
    reference = add_layer(layout, files, "tampered")
    image = f"{REPOSITORY}/{conversion.source.name}:tampered-{name}"
    copy_image(reference.split("@")[0], f"docker-archive:{base / 'tampered.tar'}:{image}")
    dockerd.load(base / "tampered.tar")
    return image


def test_the_untampered_layout_runs(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image,
                                    keys: Keys, busybox: Pair, tmp_path: Path) -> None:  # noqa: F811
    # The layout the tampering tests build on is the same image as the one converted straight to docker-archive.
    conversion = cached_conversion(tmp_path_factory, fixture_image, keys, "busybox-sh")
    assert conversion.service["fspf_tag"] == busybox.conversion.service["fspf_tag"]
    assert conversion.service["mrenclaves"] == busybox.conversion.service["mrenclaves"]
    layout = private_layout(conversion, tmp_path / "layout")
    image = f"{REPOSITORY}/busybox-sh:layout"
    copy_image(f"oci:{layout}:latest", f"docker-archive:{tmp_path / 'layout.tar'}:{image}")
    dockerd.load(tmp_path / "layout.tar")
    done = run_converted(dockerd, image, conversion.policy)
    assert done.returncode == 0, done.stderr
    assert done.stdout == run_converted(dockerd, busybox.converted, busybox.policy).stdout


def test_a_layer_that_changes_one_byte_of_an_encrypted_file_is_refused(
        dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image,
        keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    conversion = cached_conversion(tmp_path_factory, fixture_image, keys, "busybox-sh")
    image = tampered_image(dockerd, conversion, tmp_path, "encrypted", {"/app/conf/app.conf": None})
    line = refusal(run_converted(dockerd, image, conversion.policy), EXIT_PROTECTION)
    assert "/app/conf/app.conf" in line and "protection check failed" in line


def test_a_layer_that_changes_one_byte_of_interpreted_code_is_refused(
        dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image,
        keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    # Python's standard library is authenticated, not measured: the FSPF tag in the session covers it.
    conversion = cached_conversion(tmp_path_factory, fixture_image, keys, "python-app")
    path = "/usr/lib/python3.11/json/__init__.py"
    image = tampered_image(dockerd, conversion, tmp_path, "stdlib", {path: None})
    line = refusal(run_converted(dockerd, image, conversion.policy), EXIT_PROTECTION)
    assert path in line


def test_a_layer_that_replaces_the_measured_program_is_refused(
        dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image,
        keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    conversion = cached_conversion(tmp_path_factory, fixture_image, keys, "dynamic-c")
    assert conversion.result.plan.executable == "/app/hello"
    image = tampered_image(dockerd, conversion, tmp_path, "executable", {"/app/hello": BUSYBOX.read_bytes()})
    assert image_env(dockerd, image)["SCONIFY_EXECUTABLE"] == "/app/hello"
    line = refusal(run_converted(dockerd, image, conversion.policy), EXIT_MEASUREMENT)
    expected = conversion.service["mrenclaves"][0].lower()
    measured = [m for m in re.findall(r"\b[0-9a-f]{64}\b", line.lower()) if m != expected]
    assert "measurement mismatch" in line and expected in line.lower() and len(measured) == 1, line


# -- deploy-time changes -----------------------------------------------------------------------------------------


def test_another_heap_at_deploy_time_is_refused(dockerd: DockerEngine, busybox: Pair) -> None:
    heap = int(image_env(dockerd, busybox.converted)["SCONE_HEAP"])
    done = run_converted(dockerd, busybox.converted, busybox.policy, options=("-e", f"SCONE_HEAP={heap * 2}"))
    line = refusal(done, EXIT_MEASUREMENT)
    assert "measurement mismatch" in line and busybox.conversion.service["mrenclaves"][0].lower() in line.lower()


def test_the_same_heap_in_other_words_is_accepted(dockerd: DockerEngine, busybox: Pair) -> None:
    heap = int(image_env(dockerd, busybox.converted)["SCONE_HEAP"])
    assert heap % (1 << 20) == 0
    done = run_converted(dockerd, busybox.converted, busybox.policy, options=("-e", f"SCONE_HEAP={heap >> 20}M"))
    assert done.returncode == 0, done.stderr


def test_a_read_only_root_file_system_is_refused_with_advice(dockerd: DockerEngine, busybox: Pair) -> None:
    line = refusal(run_converted(dockerd, busybox.converted, busybox.policy, options=("--read-only",)),
                   EXIT_READ_ONLY)
    assert "--read-only" in line


# -- the session -----------------------------------------------------------------------------------------------


def test_a_session_from_a_conversion_with_another_key_is_refused(
        dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image,
        keys: Keys, busybox: Pair) -> None:  # noqa: F811
    other = cached_conversion(tmp_path_factory, fixture_image, keys, "busybox-sh", "other-key",
                              fspf_key=keys.other_fspf)
    # Same image, same enclave: only the volume key differs, so the measurement passes and the volume does not.
    assert other.service["mrenclaves"] == busybox.conversion.service["mrenclaves"]
    assert other.service["fspf_key"] != busybox.conversion.service["fspf_key"]
    line = refusal(run_converted(dockerd, busybox.converted, other.policy), EXIT_PROTECTION)
    assert "wrong key" in line


def test_a_session_of_another_image_is_refused(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory,
                                              fixture_image, keys: Keys, busybox: Pair) -> None:  # noqa: F811
    seven = loaded_pair(dockerd, tmp_path_factory, fixture_image, keys, "busybox-sh", exit_code=7)
    assert seven.conversion.session["name"] != busybox.conversion.session["name"]
    line = refusal(run_converted(dockerd, busybox.converted, seven.policy), EXIT_WRONG_SESSION)
    assert busybox.conversion.session["name"] in line and seven.conversion.session["name"] in line


def test_a_session_of_another_image_under_the_same_names_and_key_is_refused(
        dockerd: DockerEngine, fixture_image, keys: Keys, busybox: Pair, tmp_path: Path) -> None:  # noqa: F811
    # Another build of the application (another exit code in its encrypted configuration), converted with the same
    # volume key, session and service names: same enclave, but the volume's tag describes another file system.
    names = busybox.conversion.session["name"], busybox.conversion.service["name"]
    seven = convert_image(fixture_image("busybox-sh", exit_code=7), f"oci:{tmp_path / 'layout'}:latest",
                          tmp_path / "policy", keys, sign=False, session=names[0], service=names[1])
    assert (seven.session["name"], seven.service["name"]) == names
    assert seven.service["mrenclaves"] == busybox.conversion.service["mrenclaves"]
    line = refusal(run_converted(dockerd, busybox.converted, seven.policy), EXIT_PROTECTION)
    assert "tag mismatch" in line
    assert busybox.conversion.service["fspf_tag"] in line and seven.service["fspf_tag"] in line


def test_without_a_session_the_image_refuses_to_start(dockerd: DockerEngine, busybox: Pair) -> None:
    line = refusal(run_converted(dockerd, busybox.converted, None), EXIT_NO_SESSION)
    assert "SCONIFY_SESSION_FILE" in line
    # Named but not mounted.
    line = refusal(run_converted(dockerd, busybox.converted, None,
                                 options=("-e", f"SCONIFY_SESSION_FILE={SESSION_PATH}")), EXIT_NO_SESSION)
    assert SESSION_PATH in line


# -- host arguments ------------------------------------------------------------------------------------------------


def test_host_arguments_are_refused_by_default(dockerd: DockerEngine, busybox: Pair) -> None:
    assert "@@" not in busybox.conversion.service["command"]
    line = refusal(run_converted(dockerd, busybox.converted, busybox.policy, "--inject", "x"), EXIT_HOST_ARGS)
    assert "--inject" in line


def test_a_session_with_a_placeholder_takes_one_host_argument(
        dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image, keys: Keys) -> None:  # noqa: F811
    conversion, image = loaded_conversion(dockerd, tmp_path_factory, fixture_image("busybox-sh"), keys, "host-arg",
                                          command=("/app/run.sh", "@@1"))
    assert conversion.service["command"] == "/app/run.sh @@1"
    done = run_converted(dockerd, image, conversion.policy, "two words")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["run.sh: argc=1", "run.sh: arg[1]=two words"]
    # Without the argument the placeholder disappears; a second one is more than the session allows.
    none = run_converted(dockerd, image, conversion.policy)
    assert none.returncode == 0 and none.stdout.splitlines()[0] == "run.sh: argc=0", none.stderr
    line = refusal(run_converted(dockerd, image, conversion.policy, "one", "--two"), EXIT_HOST_ARGS)
    assert "--two" in line


def test_the_placeholder_is_the_sessions_choice_not_the_images(dockerd: DockerEngine, busybox: Pair,
                                                              tmp_path: Path) -> None:
    # The command is not measured: the session decides, so a session that allows an argument lets it through.
    policy = other_session(busybox.policy, tmp_path / "session.yml",
                           command=busybox.conversion.service["command"] + " @@1")
    done = run_converted(dockerd, busybox.converted, policy, "from the host")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == ["run.sh: argc=2", "run.sh: arg[1]=hello", "run.sh: arg[2]=from the host"]
