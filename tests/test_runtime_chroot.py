"""sconify-run for real, as root in a chroot: a protected shell-script application starts, and tampering is refused.

Each test protects the same plain tree into a fresh root with the Python FSPF writer, writes the session
the converter would write, and starts ``/.sconify/bin/sconify-run`` in that root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_runtime_support import (  # noqa: F401 (runtime_binary is a fixture)
    APP_GID,
    APP_UID,
    BUSYBOX,
    DATA,
    EXIT_BAD_CONFIG,
    EXIT_BAD_SESSION,
    EXIT_HOST_ARGS,
    EXIT_MEASUREMENT,
    EXIT_NO_SERVICE,
    EXIT_NO_SESSION,
    EXIT_PROTECTION,
    EXIT_READ_ONLY,
    EXIT_START,
    SESSION_PATH,
    ProtectedRoot,
    make_source_tree,
    protect_tree,
    python_mrenclave,
    require_chroot,
    run_chroot,
    runtime_binary,
    service,
    stderr_line,
    write_session,
)

from sconify.enclave.settings import EnclaveSettings
from sconify.fspf import VolumeKey


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory, runtime_binary: Path) -> Path:  # noqa: F811
    require_chroot()
    return make_source_tree(tmp_path_factory.mktemp("runtime-src"), runtime_binary)


@pytest.fixture
def app(tmp_path: Path, source_tree: Path, runtime_binary: Path) -> ProtectedRoot:  # noqa: F811
    """A freshly protected root with the session for its service ``app`` written."""
    pr = protect_tree(source_tree, tmp_path / "root", runtime_binary)
    write_session(pr, [service(pr)])
    return pr


def test_app_runs_as_its_user_with_its_files_readable(app: ProtectedRoot) -> None:
    at_rest = (app.root / "app/data.txt").read_bytes()
    assert DATA[:64] not in at_rest  # ciphertext before the start

    done = run_chroot(app.root, app.env)

    assert done.returncode == 3, done.stderr
    assert done.stderr == b""
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "hello from the app"
    assert lines[1] == f"uid={APP_UID} gid={APP_GID} groups={APP_GID}"
    assert lines[2] == "pwd=/app"
    assert lines[3] == "greeting=hello, world"
    assert done.stdout.endswith(DATA)


def test_decrypted_files_keep_owner_mode_and_mtime(app: ProtectedRoot, source_tree: Path) -> None:
    app_dir = app.root / "app"
    dir_before = app_dir.stat()

    assert run_chroot(app.root, app.env).returncode == 3

    for name in ("run.sh", "data.txt"):
        original = (source_tree / "app" / name).stat()
        now = (app_dir / name).lstat()
        assert (app_dir / name).read_bytes() == (source_tree / "app" / name).read_bytes()
        assert (now.st_uid, now.st_gid) == (original.st_uid, original.st_gid)
        assert stat.S_IMODE(now.st_mode) == stat.S_IMODE(original.st_mode)
        assert now.st_mtime_ns == original.st_mtime_ns
    # No temporary file is left, and the directory's own mtime is put back.
    assert sorted(p.name for p in app_dir.iterdir()) == ["args.sh", "data.txt", "run.sh"]
    assert app_dir.stat().st_mtime_ns == dir_before.st_mtime_ns


def test_environment_is_exactly_the_sessions(app: ProtectedRoot) -> None:
    write_session(app, [service(app, command="/bin/env", environment={"PATH": "/bin", "A": "1", "B": "x=y z"})])
    env = dict(app.env, HOSTNAME="from-the-host", SECRET="host-supplied")

    done = run_chroot(app.root, env)

    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.decode().splitlines()) == ["A=1", "B=x=y z", "PATH=/bin"]


def test_command_found_through_the_sessions_path(app: ProtectedRoot) -> None:
    write_session(app, [service(app, command="echo found 'through PATH'")])
    done = run_chroot(app.root, app.env)
    assert (done.returncode, done.stdout) == (0, b"found through PATH\n")


def test_a_restarted_container_starts_again(app: ProtectedRoot) -> None:
    first = run_chroot(app.root, app.env)
    second = run_chroot(app.root, app.env)
    assert first.returncode == second.returncode == 3
    assert second.stdout == first.stdout


def test_tampering_with_a_decrypted_file_is_refused_at_the_next_start(app: ProtectedRoot) -> None:
    assert run_chroot(app.root, app.env).returncode == 3
    data = app.root / "app/data.txt"
    data.write_bytes(data.read_bytes().replace(b"confidential", b"CONFIDENTIAL", 1))

    done = run_chroot(app.root, app.env)

    assert done.returncode == EXIT_PROTECTION
    line = stderr_line(done)
    assert "/app/data.txt" in line and "tampered-chunk" in line and "chunk 0" in line


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_flipped_byte_is_refused_and_leaves_no_plaintext(app: ProtectedRoot) -> None:
    # run.sh sorts after data.txt: data.txt is decrypted into a temporary file before run.sh fails.
    flip_byte(app.root / "app/run.sh", 10)
    before = (app.root / "app/data.txt").read_bytes()

    done = run_chroot(app.root, app.env)

    assert done.returncode == EXIT_PROTECTION
    line = stderr_line(done)
    assert "/app/run.sh" in line and "tampered-chunk" in line
    assert done.stdout == b""
    assert sorted(p.name for p in (app.root / "app").iterdir()) == ["args.sh", "data.txt", "run.sh"]
    assert (app.root / "app/data.txt").read_bytes() == before


def test_a_flipped_byte_in_an_authenticated_file_is_refused(app: ProtectedRoot) -> None:
    flip_byte(app.root / "etc/motd", 3)
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_PROTECTION
    assert "/etc/motd" in stderr_line(done)


def test_an_added_file_is_refused(app: ProtectedRoot) -> None:
    (app.root / "app/extra.py").write_bytes(b"print('injected')\n")
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_PROTECTION
    line = stderr_line(done)
    assert "/app/extra.py" in line and "unexpected" in line


def test_a_removed_file_is_refused(app: ProtectedRoot) -> None:
    (app.root / "etc/motd").unlink()
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_PROTECTION
    line = stderr_line(done)
    assert "/etc/motd" in line and "missing" in line


def test_a_truncated_file_is_refused(app: ProtectedRoot) -> None:
    data = app.root / "app/data.txt"
    data.write_bytes(data.read_bytes()[:-1])
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_PROTECTION
    assert "truncated" in stderr_line(done)


def test_a_wrong_tag_is_refused(app: ProtectedRoot) -> None:
    wrong = bytes.fromhex(app.tag)
    wrong = bytes([wrong[0] ^ 0x80]) + wrong[1:]
    write_session(app, [service(app, fspf_tag=wrong.hex())])

    done = run_chroot(app.root, app.env)

    assert done.returncode == EXIT_PROTECTION
    line = stderr_line(done)
    assert "tag mismatch" in line and app.tag in line and wrong.hex() in line


def test_a_wrong_key_is_refused(app: ProtectedRoot) -> None:
    write_session(app, [service(app, fspf_key=VolumeKey.generate().hex())])
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_PROTECTION
    assert "wrong key" in stderr_line(done)


def test_a_session_from_another_conversion_is_refused(
    app: ProtectedRoot, tmp_path: Path, source_tree: Path, runtime_binary: Path  # noqa: F811
) -> None:
    other = protect_tree(source_tree, tmp_path / "other", runtime_binary)
    write_session(app, [service(other)])  # same names and measurement, another key and tag

    done = run_chroot(app.root, app.env)

    assert done.returncode == EXIT_PROTECTION
    assert "wrong key" in stderr_line(done)


def test_a_changed_heap_is_refused_with_both_measurements(app: ProtectedRoot, runtime_binary: Path) -> None:  # noqa: F811
    done = run_chroot(app.root, dict(app.env, SCONE_HEAP="128M"))

    assert done.returncode == EXIT_MEASUREMENT
    line = stderr_line(done)
    measured = python_mrenclave(runtime_binary, BUSYBOX, EnclaveSettings.from_options(heap="128M"))
    assert "measurement mismatch" in line and measured in line and app.mrenclave in line


def test_a_replaced_executable_is_refused(app: ProtectedRoot, runtime_binary: Path) -> None:  # noqa: F811
    busybox = app.root / "bin/busybox"
    data = bytearray(busybox.read_bytes())
    data[0x2000] ^= 0xFF  # one byte of the loaded code
    busybox.write_bytes(bytes(data))

    done = run_chroot(app.root, app.env)

    assert done.returncode == EXIT_MEASUREMENT
    assert "measurement mismatch" in stderr_line(done)


def test_a_session_without_this_service_is_refused(app: ProtectedRoot) -> None:
    write_session(app, [service(app, name="other-service")])
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_NO_SERVICE
    line = stderr_line(done)
    assert "no service 'app'" in line


def test_a_session_with_another_name_is_refused(app: ProtectedRoot) -> None:
    write_session(app, [service(app)], name="someone-elses-session")
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_NO_SERVICE
    assert "someone-elses-session" in stderr_line(done)


def test_no_session_is_refused(app: ProtectedRoot) -> None:
    env = {k: v for k, v in app.env.items() if k != "SCONIFY_SESSION_FILE"}
    done = run_chroot(app.root, env)
    assert done.returncode == EXIT_NO_SESSION
    line = stderr_line(done)
    assert "SCONIFY_SESSION_FILE" in line and "docker run -v" in line


def test_a_missing_session_file_is_refused(app: ProtectedRoot) -> None:
    (app.root / SESSION_PATH.lstrip("/")).unlink()
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_NO_SESSION
    assert SESSION_PATH in stderr_line(done)


def test_a_malformed_session_is_refused(app: ProtectedRoot) -> None:
    (app.root / SESSION_PATH.lstrip("/")).write_text("name: demo-session\nservices: [unclosed\n")
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_BAD_SESSION
    assert "not valid YAML" in stderr_line(done)


def test_a_malformed_setting_is_refused(app: ProtectedRoot) -> None:
    done = run_chroot(app.root, dict(app.env, SCONE_THREADS="many"))
    assert done.returncode == EXIT_BAD_CONFIG
    assert "SCONE_THREADS" in stderr_line(done)


def test_host_arguments_are_refused_without_placeholders(app: ProtectedRoot) -> None:
    done = run_chroot(app.root, app.env, ["--debug"])
    assert done.returncode == EXIT_HOST_ARGS
    line = stderr_line(done)
    assert "host arguments refused" in line and "--debug" in line
    assert done.stdout == b""


def test_host_arguments_fill_placeholders(app: ProtectedRoot) -> None:
    write_session(app, [service(app, command="/bin/sh /app/args.sh fixed @@1 'pre-@@2-post'")])

    done = run_chroot(app.root, app.env, ["first arg", "second"])

    assert done.returncode == 0, done.stderr
    assert done.stdout.split(b"\0")[:-1] == [b"fixed", b"first arg", b"pre-second-post"]


def test_read_only_root_is_refused_with_what_to_do(app: ProtectedRoot) -> None:
    done = run_chroot(app.root, app.env, read_only=True)
    assert done.returncode == EXIT_READ_ONLY
    line = stderr_line(done)
    assert "read-only" in line and "--read-only" in line
    assert sorted(p.name for p in (app.root / "app").iterdir()) == ["args.sh", "data.txt", "run.sh"]


def test_read_only_root_works_once_decrypted(app: ProtectedRoot) -> None:
    assert run_chroot(app.root, app.env).returncode == 3
    done = run_chroot(app.root, app.env, read_only=True)
    assert done.returncode == 3, done.stderr


def test_what_the_container_runtime_adds_is_tolerated(app: ProtectedRoot) -> None:
    # Docker's init layer: an empty /.dockerenv, /etc/mtab -> /proc/mounts, files it mounts over.
    (app.root / ".dockerenv").write_bytes(b"")
    (app.root / "etc/mtab").symlink_to("/proc/mounts")
    (app.root / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n")
    done = run_chroot(app.root, app.env)
    assert done.returncode == 3, done.stderr


def test_an_mtab_pointing_elsewhere_is_refused(app: ProtectedRoot) -> None:
    (app.root / "etc/mtab").symlink_to("/app/data.txt")
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_PROTECTION
    assert "/etc/mtab" in stderr_line(done)


def test_a_dockerenv_with_content_is_refused(app: ProtectedRoot) -> None:
    (app.root / ".dockerenv").write_bytes(b"not what docker writes")
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_PROTECTION
    assert "/.dockerenv" in stderr_line(done)


def test_a_missing_working_directory_is_refused(app: ProtectedRoot) -> None:
    write_session(app, [service(app, pwd="/nowhere")])
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_START
    assert "/nowhere" in stderr_line(done)


def test_a_missing_command_exits_127_like_docker(app: ProtectedRoot) -> None:
    write_session(app, [service(app, command="no-such-program --flag")])
    done = run_chroot(app.root, app.env)
    assert done.returncode == 127
    assert "no-such-program" in stderr_line(done)


def test_a_command_the_user_may_not_execute_exits_126(app: ProtectedRoot) -> None:
    write_session(app, [service(app, command="/app/run.sh")])  # mode 0750, owner 1000:1001
    done = run_chroot(app.root, dict(app.env, SCONIFY_USER="2000:2000"))
    assert done.returncode == 126
    assert "/app/run.sh" in stderr_line(done)


def test_links_in_an_encrypted_region_survive(tmp_path: Path, runtime_binary: Path) -> None:  # noqa: F811
    require_chroot()
    src = make_source_tree(tmp_path, runtime_binary)
    os.link(src / "app/data.txt", src / "app/hardlink.txt")
    (src / "app/symlink.txt").symlink_to("data.txt")
    pr = protect_tree(src, tmp_path / "root", runtime_binary)
    command = "/bin/sh -c 'cat /app/hardlink.txt /app/symlink.txt'"
    write_session(pr, [service(pr, command=command)])
    assert os.stat(pr.root / "app/hardlink.txt").st_ino == os.stat(pr.root / "app/data.txt").st_ino

    for _ in range(2):  # the first start decrypts, the second finds the plaintext
        done = run_chroot(pr.root, pr.env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == DATA + DATA

    data, link = os.stat(pr.root / "app/data.txt"), os.stat(pr.root / "app/hardlink.txt")
    assert (data.st_ino, data.st_nlink) == (link.st_ino, 2)
    assert os.readlink(pr.root / "app/symlink.txt") == "data.txt"
