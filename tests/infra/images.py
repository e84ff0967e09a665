"""Tiny test images made offline with umoci, and skopeo as an independent mover and judge.

Nothing is pulled from the internet: a runnable image is a static busybox from the machine
(``/usr/bin/busybox``, Debian's busybox-static) plus a few applet symlinks and the caller's files.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

BUSYBOX = Path("/usr/bin/busybox")
APPLETS = ("sh", "echo", "cat", "ls", "env", "true", "false", "id", "pwd", "sleep")


def busybox_rootfs(dest: Path, files: Mapping[str, bytes] | None = None) -> Path:
    """A root file system in ``dest`` with /bin/busybox, applet symlinks and ``files`` (path -> bytes)."""
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing; install the Debian package busybox-static.")
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    for path, content in (files or {}).items():
        target = dest / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return dest


def umoci(*args: str) -> subprocess.CompletedProcess:
    """Run umoci, raising CalledProcessError (with its stderr) on failure."""
    return subprocess.run(["umoci", *args], check=True, capture_output=True, text=True, timeout=120)


def skopeo(*args: str, check: bool = True, timeout: float = 120, env: Mapping[str, str] | None = None,
           ) -> subprocess.CompletedProcess:
    """Run skopeo with a private policy that accepts anything (tests make their own images)."""
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        check=check, capture_output=True, text=True, timeout=timeout, env=None if env is None else dict(env),
    )


def build_oci_image(
    layout: Path,
    tag: str,
    rootfs: Path,
    cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = (),
    workdir: str | None = None,
) -> str:
    """Pack ``rootfs`` as one layer into the OCI layout ``layout`` (made if absent) under ``tag``.

    Returns the skopeo reference ``oci:LAYOUT:TAG``.
    """
    image = f"{layout}:{tag}"
    if not (layout / "oci-layout").exists():
        umoci("init", "--layout", str(layout))
    umoci("new", "--image", image)
    umoci("insert", "--image", image, str(rootfs), "/")
    config: list[str] = []
    for arg in cmd or ():
        config += ["--config.cmd", arg]
    for arg in entrypoint or ():
        config += ["--config.entrypoint", arg]
    for item in env:
        config += ["--config.env", item]
    if workdir:
        config += ["--config.workingdir", workdir]
    if config:
        umoci("config", "--image", image, *config)
    umoci("gc", "--layout", str(layout))  # drop the intermediate manifests and configs
    return f"oci:{image}"


def to_docker_archive(source: str, archive: Path, name: str) -> Path:
    """Copy ``source`` (a skopeo reference) to a ``docker load``-able tar that tags it ``name``."""
    skopeo("copy", source, f"docker-archive:{archive}:{name}")
    return archive
