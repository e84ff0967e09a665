"""Shared pieces of the sconify-run tests: building the launcher, protected root file systems, sessions, chroot runs.

A test root file system has the layout ``sconify convert`` produces (docs/runtime.md): a static busybox,
the application under ``/app`` (encrypted), everything else authenticated except the paths the container
runtime provides, the launcher at ``/.sconify/bin/sconify-run`` and the FSPF metadata at
``/.sconify/fspf/volume.fspf``. It is protected with the Python FSPF writer, and the session file is
written with the MRENCLAVE the Python ``measure()`` computes. Runs are real: ``unshare`` gives the run a
private mount namespace with /proc mounted inside the root, then ``chroot`` starts the launcher.

This module holds no tests; the ``test_runtime_*`` modules import its fixtures and helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sconify.enclave.measurement import measure
from sconify.enclave.settings import EnclaveSettings
from sconify.fspf import DEFAULT_CHUNK_SIZE, RegionTable, VolumeKey, protect_directory

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build-runtime"
RUNTIME = ROOT / "sconify" / "data" / "runtime" / "sconify-run"
BUSYBOX = Path("/usr/bin/busybox")
LAUNCHER_PATH = "/.sconify/bin/sconify-run"
METADATA_PATH = "/.sconify/fspf/volume.fspf"
SESSION_PATH = "/run/sconify/session.yml"
APPLETS = ("sh", "echo", "cat", "id", "env", "sleep", "ls", "printf", "kill", "true")

# The regions of the default rule (rules/default.yaml) for an image whose application lives in /app.
REGIONS = (
    "authenticated:/",
    "encrypted:/app",
    "not-protected:/proc",
    "not-protected:/sys",
    "not-protected:/dev",
    "not-protected:/tmp",
    "not-protected:/run",
    "not-protected:/etc/hosts",
    "not-protected:/etc/resolv.conf",
    "not-protected:/etc/hostname",
)

# Exit codes of sconify-run (docs/runtime.md).
EXIT_NO_SESSION = 221
EXIT_BAD_SESSION = 222
EXIT_NO_SERVICE = 223
EXIT_BAD_CONFIG = 224
EXIT_MEASUREMENT = 225
EXIT_PROTECTION = 226
EXIT_HOST_ARGS = 227
EXIT_READ_ONLY = 228
EXIT_START = 229

APP_UID = 1000
APP_GID = 1001

RUN_SH = b"""#!/bin/sh
echo "hello from the app"
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "pwd=$(pwd)"
echo "greeting=$GREETING"
cat /app/data.txt
exit 3
"""
ARGS_SH = b"""#!/bin/sh
for a in "$@"; do printf '%s\\000' "$a"; done
"""
DATA = b"the application's confidential data\n" * 4000  # several 64 KiB chunks


def build_runtime() -> Path:
    """Build sconify-run from runtime/src with scripts/build-runtime (a no-op when it is up to date)."""
    if not BUSYBOX.exists():
        pytest.skip("static busybox is missing; install the Debian package busybox-static")
    done = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"scripts/build-runtime failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
    return RUNTIME


@pytest.fixture(scope="session")
def runtime_binary() -> Path:
    """The launcher built from this tree's sources."""
    return build_runtime()


def require_chroot() -> None:
    """Skip unless this process may chroot and mount /proc in a private mount namespace (root, unshare)."""
    if os.geteuid() != 0:
        pytest.skip("chroot runs need root (chroot and mounting /proc); run the tests as root")
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        pytest.skip("unshare or chroot is missing; install util-linux and coreutils")


def python_mrenclave(runtime: Path, executable: Path | None, settings: EnclaveSettings | None = None) -> str:
    """MRENCLAVE as the converter computes it (the reference the launcher must agree with)."""
    exe = executable.read_bytes() if executable is not None else None
    return measure(runtime.read_bytes(), exe, settings or EnclaveSettings()).mrenclave.hex()


def make_source_tree(base: Path, runtime: Path, files: Mapping[str, tuple[bytes, int, int, int]] | None = None) -> Path:
    """A plain root file system: static busybox with applets, /app files, the launcher, runtime mount points.

    ``files`` maps absolute paths to (content, mode, uid, gid); by default the shell-script application.
    """
    src = base / "src"
    (src / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, src / "bin" / "busybox")
    for applet in APPLETS:
        (src / "bin" / applet).symlink_to("busybox")
    for directory in ("proc", "sys", "dev", "tmp", "run", "etc", ".sconify/bin"):
        (src / directory).mkdir(parents=True, exist_ok=True)
    (src / "etc" / "motd").write_bytes(b"an authenticated file\n")
    # What a container runtime puts in /dev (a shell redirects background jobs from /dev/null).
    for name, minor in (("null", 3), ("zero", 5)):
        os.mknod(src / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        os.chmod(src / "dev" / name, 0o666)
    shutil.copy2(runtime, src / LAUNCHER_PATH.lstrip("/"))
    app = files if files is not None else {
        "/app/run.sh": (RUN_SH, 0o750, APP_UID, APP_GID),
        "/app/args.sh": (ARGS_SH, 0o755, 0, 0),
        "/app/data.txt": (DATA, 0o640, APP_UID, APP_GID),
    }
    for path, (content, mode, uid, gid) in app.items():
        target = src / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        os.chown(target, uid, gid)
        os.chmod(target, mode)
        os.utime(target, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return src


@dataclass
class ProtectedRoot:
    """A protected root file system ready to run, with what its session needs."""

    root: Path
    key: VolumeKey
    tag: str
    mrenclave: str
    env: dict[str, str] = field(default_factory=dict)


def protect_tree(src: Path, dest: Path, runtime: Path, regions: Sequence[str] = REGIONS,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> ProtectedRoot:
    """Protect ``src`` into ``dest`` with a fresh key; the default environment runs the app as 1000:1001."""
    key = VolumeKey.generate()
    result = protect_directory(src, dest, RegionTable.of(regions), key, metadata_path=METADATA_PATH,
                               chunk_size=chunk_size)
    env = {
        "SCONE_CONFIG_ID": "demo-session/app",
        "SCONE_MODE": "sim",
        "SCONE_CAS_ADDR": "cas.invalid",
        "SCONE_LAS_ADDR": "las.invalid",
        "SCONIFY_SESSION_FILE": SESSION_PATH,
        "SCONIFY_EXECUTABLE": "/bin/busybox",
        "SCONIFY_USER": f"{APP_UID}:{APP_GID}",
        "SCONE_HEAP": "64M",
        "SCONE_STACK": "1M",
        "SCONE_THREADS": "8",
        "SCONE_ALLOW_DLOPEN": "off",
        "SCONE_DEBUG": "0",
    }
    return ProtectedRoot(dest, key, result.tag.hex(), python_mrenclave(runtime, BUSYBOX), env)


def service(pr: ProtectedRoot, **overrides: object) -> dict[str, object]:
    """The session's service entry for a protected root (the shell-script application by default)."""
    entry: dict[str, object] = {
        "name": "app",
        "image_name": "app-image",
        "mrenclaves": [pr.mrenclave],
        "command": "/bin/sh /app/run.sh",
        "environment": {"PATH": "/bin", "GREETING": "hello, world"},
        "pwd": "/app",
        "fspf_path": METADATA_PATH,
        "fspf_key": pr.key.hex(),
        "fspf_tag": pr.tag,
    }
    entry.update(overrides)
    return entry


def write_session(pr: ProtectedRoot, services: Sequence[Mapping[str, object]], name: str = "demo-session",
                  path: Path | None = None) -> Path:
    """Write the session file (JSON is YAML), by default at SESSION_PATH inside the root; mode 0600, it holds keys."""
    session = {
        "name": name,
        "version": "0.3",
        "access_policy": {"read": ["CREATOR"], "update": ["CREATOR"]},
        "services": list(services),
        "security": {"attestation": {"mode": "none"}},
    }
    path = path or pr.root / SESSION_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(session, indent=2))
    path.chmod(0o600)
    return path


def chroot_command(root: Path, args: Sequence[str] = (), *, read_only: bool = False) -> list[str]:
    """The command that starts the launcher in ``root`` with /proc mounted, in a private mount namespace.

    Every step execs the next, so the launcher (and then the application) keeps the process id.
    """
    script = ""
    if read_only:
        script += 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && '
    script += f'mount -t proc proc "$0/proc" && exec chroot "$0" {LAUNCHER_PATH} "$@"'
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, str(root), *args]


def run_chroot(
    root: Path, env: Mapping[str, str], args: Sequence[str] = (), *, read_only: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the launcher in ``root`` with exactly ``env``; stdout and stderr are captured as bytes."""
    return subprocess.run(
        chroot_command(root, args, read_only=read_only), env=dict(env), capture_output=True, timeout=timeout
    )


def stderr_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """The launcher's refusal: exactly one line on stderr."""
    text = done.stderr.decode("utf-8", "replace")
    assert text.count("\n") == 1 and text.endswith("\n"), f"expected one line on stderr, got {text!r}"
    assert text.startswith("sconify-run: "), text
    return text
