"""The open runtime with the development CAS: when ``SCONE_CAS_ADDR`` names one, sconify-run presents its
measurement, gets its command, environment (secrets filled in), file-system key and injected files, writes the
files where the application expects them, and starts; a measurement the session does not allow gets nothing.

Runs are real: the launcher built from runtime/src in a chroot (tests/test_runtime_support.py), the CAS a
``sconify cas serve --unix`` process whose socket lies inside the root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_cas_dev import Cas
from test_runtime_support import (  # noqa: F401 (runtime_binary is a fixture)
    APP_GID,
    APP_UID,
    EXIT_BAD_CONFIG,
    EXIT_MEASUREMENT,
    EXIT_NO_SERVICE,
    EXIT_NO_SESSION,
    EXIT_PROTECTION,
    EXIT_READ_ONLY,
    make_source_tree,
    protect_tree,
    require_chroot,
    run_chroot,
    runtime_binary,
    service,
    stderr_line,
)

SOCKET = "/run/cas/cas.sock"
APP = (
    "echo user=$(id -u):$(id -g); echo password=$PASSWORD; cat /etc/app/password.txt; echo;"
    " ls -ln /etc/app/password.txt; ls -ldn /data"
)


def _session(pr, mrenclave: str | None = None) -> dict:
    entry = service(pr, command=f"/bin/sh -c '{APP}'",
                    environment={"PATH": "/bin", "PASSWORD": "$$SCONE::password$$"})
    if mrenclave is not None:
        entry["mrenclaves"] = [mrenclave]
    return {
        "name": "demo-session",
        "version": "0.3.10",
        "services": [entry],
        "images": [{"name": "app-image",
                    "injection_files": [{"path": "/etc/app/password.txt", "content": "$$SCONE::password$$"}],
                    "volumes": [{"name": "data", "path": "/data"}]}],
        "volumes": [{"name": "data"}],
        "secrets": [{"name": "password", "kind": "ascii", "size": 24}],
    }


@pytest.fixture
def root(tmp_path: Path, runtime_binary: Path):  # noqa: F811
    require_chroot()
    src = make_source_tree(tmp_path, runtime_binary)
    pr = protect_tree(src, tmp_path / "r", runtime_binary)
    (pr.root / "run" / "cas").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in pr.env.items() if k != "SCONIFY_SESSION_FILE"}
    env["SCONE_CAS_ADDR"] = f"unix:{SOCKET}"
    return pr, env


@pytest.fixture
def cas(root, tmp_path: Path):
    pr, _ = root
    server = Cas(tmp_path / "state", "--unix", str(pr.root / SOCKET.lstrip("/")))
    yield server
    server.stop()


def test_the_runtime_gets_its_configuration_and_files_from_the_cas(root, cas: Cas) -> None:
    pr, env = root
    status, _ = cas.call("POST", "/v1/sessions", _session(pr))
    assert status == 201
    done = run_chroot(pr.root, env)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    words = " ".join(out.split())
    _, config = cas.call("POST", "/v1/configs", {"config_id": "demo-session/app", "mrenclave": pr.mrenclave})
    password = config["environment"]["PASSWORD"]
    assert len(password) == 24
    assert f"user={APP_UID}:{APP_GID}" in out
    assert f"password={password}" in out
    assert f"\n{password}\n" in out, "the injected file holds the generated secret"
    assert f"-rw------- 1 {APP_UID} {APP_GID} 24 " in words, "the injected file is private to the application's user"
    assert f"drwx------ 2 {APP_UID} {APP_GID} " in words, "the volume's directory belongs to the application's user"
    assert password.encode() not in done.stderr


def test_a_restarted_container_finds_what_its_first_start_wrote_and_starts_again(root, cas: Cas) -> None:
    """Injected files and volume directories lie in the authenticated region here (the root); a container started
    again with its old file system finds them there, left by the first start, and must start again."""
    pr, env = root
    cas.call("POST", "/v1/sessions", _session(pr))
    first = run_chroot(pr.root, env)
    assert first.returncode == 0, first.stderr
    (pr.root / "data" / "state.db").write_bytes(b"what the application keeps in its volume")
    again = run_chroot(pr.root, env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout  # the same secret, injected again; the same volume
    assert (pr.root / "data" / "state.db").exists()


@pytest.mark.parametrize("change", ["stranger-beside", "link-to-authenticated", "symlinked-parent",
                                    "symlinked-volume", "directory-instead"])
def test_what_a_restart_accepts_is_only_what_the_cas_writes(root, cas: Cas, change: str) -> None:
    pr, env = root
    cas.call("POST", "/v1/sessions", _session(pr))
    assert run_chroot(pr.root, env).returncode == 0
    motd = (pr.root / "etc" / "motd").read_bytes()
    injected = pr.root / "etc" / "app" / "password.txt"
    if change == "stranger-beside":
        (pr.root / "etc" / "app" / "other.txt").write_bytes(b"planted")
    elif change == "link-to-authenticated":  # truncating the old file in place would overwrite /etc/motd
        injected.unlink()
        os.link(pr.root / "etc" / "motd", injected)
    elif change == "symlinked-parent":  # writing through it would land outside the checked tree
        shutil.rmtree(pr.root / "etc" / "app")
        (pr.root / "etc" / "app").symlink_to("/tmp")
    elif change == "symlinked-volume":
        shutil.rmtree(pr.root / "data")
        (pr.root / "data").symlink_to("/tmp")
    else:
        injected.unlink()
        injected.mkdir()
    done = run_chroot(pr.root, env)
    if change == "link-to-authenticated":
        assert done.returncode == 0, done.stderr
        assert (pr.root / "etc" / "motd").read_bytes() == motd
        assert injected.stat().st_ino != (pr.root / "etc" / "motd").stat().st_ino
        assert run_chroot(pr.root, env).returncode == 0  # and /etc/motd still verifies
        return
    assert done.returncode == EXIT_PROTECTION, done.stderr
    assert "unexpected" in stderr_line(done) and done.stdout == b""


def test_a_directory_where_a_file_is_injected_in_an_unchecked_place_is_named(root, cas: Cas) -> None:
    """Outside the protected regions nothing is checked, so the runtime meets the directory only when it
    replaces the injected file: one sentence that names the path and the way out, and the command never runs."""
    pr, env = root
    session = _session(pr)
    session["images"][0]["injection_files"].append({"path": "/tmp/app/token", "content": "$$SCONE::password$$"})
    cas.call("POST", "/v1/sessions", session)
    (pr.root / "tmp" / "app" / "token").mkdir(parents=True)
    done = run_chroot(pr.root, env)
    assert done.returncode == EXIT_READ_ONLY, done.stderr
    line = stderr_line(done)
    assert "/tmp/app/token" in line and "remove what is there" in line and done.stdout == b""


def test_a_measurement_not_in_the_session_gets_nothing(root, cas: Cas) -> None:
    pr, env = root
    cas.call("POST", "/v1/sessions", _session(pr, mrenclave="ab" * 32))
    done = run_chroot(pr.root, env)
    assert done.returncode == EXIT_MEASUREMENT
    line = stderr_line(done)
    assert "refused" in line and pr.mrenclave in line
    assert done.stdout == b""
    assert not (pr.root / "etc" / "app").exists() and not (pr.root / "data").exists()


def test_no_such_service_and_no_cas(root, cas: Cas, tmp_path: Path) -> None:
    pr, env = root
    cas.call("POST", "/v1/sessions", _session(pr))
    done = run_chroot(pr.root, {**env, "SCONE_CONFIG_ID": "demo-session/other"})
    assert done.returncode == EXIT_NO_SERVICE, done.stderr
    assert "no configuration demo-session/other" in stderr_line(done)
    done = run_chroot(pr.root, {**env, "SCONE_CAS_ADDR": "unix:/run/cas/missing.sock"})
    assert done.returncode == EXIT_NO_SESSION
    assert "cannot be reached" in stderr_line(done)
    # An https:// CAS without a pinned certificate is refused with the way out.
    done = run_chroot(pr.root, {**env, "SCONE_CAS_ADDR": "https://127.0.0.1:1"})
    assert done.returncode == EXIT_BAD_CONFIG
    assert "SCONIFY_CAS_CA is not set" in stderr_line(done)


def test_without_a_development_cas_the_session_file_is_used_as_before(root, tmp_path: Path) -> None:
    pr, env = root
    done = run_chroot(pr.root, {**env, "SCONE_CAS_ADDR": "cas.scone:8081"})
    assert done.returncode == EXIT_NO_SESSION
    assert "SCONIFY_SESSION_FILE is not set" in stderr_line(done)
    assert shutil.which("unshare") and os.geteuid() == 0


# -- HTTPS: the launcher built with OpenSSL's libssl -------------------------------------------------------------

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")


def build_tls_runtime(out: Path) -> Path:
    """sconify-run compiled from runtime/src with SCONIFY_RUN_TLS and linked statically with libssl (what
    scripts/build-runtime does once it adds -DSCONIFY_RUN_TLS and libssl.a; docs/cas.md)."""
    import subprocess

    for lib in ("libssl.a", "libcrypto.a", "libyaml.a"):
        if not (LIBDIR / lib).exists():
            pytest.skip(f"{LIBDIR / lib} is missing; install libssl-dev and libyaml-dev")
    src = Path(__file__).resolve().parents[1] / "runtime" / "src"
    out.mkdir(parents=True, exist_ok=True)
    objects = []
    for c in sorted(src.glob("*.c")):
        obj = out / (c.stem + ".o")
        subprocess.run(["gcc", "-std=gnu11", "-O2", "-D_GNU_SOURCE", "-DSCONIFY_RUN_TLS", "-Wall", "-Wextra",
                        "-Werror", "-c", str(c), "-o", str(obj)], check=True, capture_output=True, cwd=src)
        objects.append(str(obj))
    binary = out / "sconify-run"
    subprocess.run(["gcc", "-static-pie", "-s", "-o", str(binary), *objects, str(LIBDIR / "libyaml.a"),
                    str(LIBDIR / "libssl.a"), str(LIBDIR / "libcrypto.a"), "-lpthread"], check=True,
                   capture_output=True)
    return binary


def test_over_https_with_the_cas_certificate_pinned(tmp_path: Path) -> None:
    require_chroot()
    runtime = build_tls_runtime(tmp_path / "build")
    pr = protect_tree(make_source_tree(tmp_path, runtime), tmp_path / "r", runtime)
    server = Cas(tmp_path / "state", "--listen", "127.0.0.1:0")
    try:
        assert server.call("POST", "/v1/sessions", _session(pr))[0] == 201
        shutil.copy(tmp_path / "state" / "cas.crt", pr.root / "run" / "cas.crt")
        env = {k: v for k, v in pr.env.items() if k != "SCONIFY_SESSION_FILE"}
        env.update(SCONE_CAS_ADDR=server.address, SCONIFY_CAS_CA="/run/cas.crt")
        done = run_chroot(pr.root, env)
        assert done.returncode == 0, done.stderr
        _, config = server.call("POST", "/v1/configs", {"config_id": "demo-session/app", "mrenclave": pr.mrenclave})
        assert f"password={config['environment']['PASSWORD']}" in done.stdout.decode()
        # Another certificate pinned: the runtime does not talk to a CAS it cannot authenticate.
        from test_cas_support import self_made_client

        other = self_made_client(tmp_path / "other")
        shutil.copy(other.cert, pr.root / "run" / "other.crt")
        done = run_chroot(pr.root, {**env, "SCONIFY_CAS_CA": "/run/other.crt"})
        assert done.returncode == EXIT_NO_SESSION
        assert "TLS handshake" in stderr_line(done)
        done = run_chroot(pr.root, {k: v for k, v in env.items() if k != "SCONIFY_CAS_CA"})
        assert "SCONIFY_CAS_CA is not set" in stderr_line(done)
    finally:
        server.stop()
