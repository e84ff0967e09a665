"""Docker's run-time semantics of an image config as pure functions: argv, environment, PATH, USER, WorkingDir.

Nothing here reads an image; callers pass the config section and, for USER, the text of the image's
``/etc/passwd`` and ``/etc/group``. The rules follow what Docker (moby) and runc do when a container starts.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The PATH Docker puts into a container whose image sets none (moby's oci.DefaultPathEnv on Linux).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _string_list(value: Any) -> list[str] | None:
    """An Entrypoint or Cmd as Docker reads it: null, a list of strings, or a lone string (one item)."""
    if value is None:
        return None
    if isinstance(value, str):
        # moby's strslice: a JSON string is a one-item list, not a shell command.
        return [value]
    if isinstance(value, list):
        return ["" if item is None else str(item) for item in value]
    return None


@dataclass(frozen=True)
class Command:
    """The argv a container of the image starts with, and where each part came from."""

    argv: tuple[str, ...]
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None
    shell_form: bool  # Docker's shell form: [SHELL..., "-c", "command string"]

    @property
    def empty(self) -> bool:
        return not self.argv


def compose_command(config: Mapping[str, Any]) -> Command:
    """Entrypoint followed by Cmd, every item kept, exactly as ``docker run IMAGE`` would exec them.

    An empty or null Entrypoint leaves Cmd alone; a Cmd is appended whole after a multi-item Entrypoint.
    """
    entrypoint = _string_list(config.get("Entrypoint"))
    cmd = _string_list(config.get("Cmd"))
    argv = tuple((entrypoint or []) + (cmd or []))
    shell = _string_list(config.get("Shell")) or ["/bin/sh", "-c"]
    shell_form = False
    for part in (entrypoint, cmd):
        # Docker stores SHELL-form instructions as the shell, its flag and one string.
        if part and len(part) == len(shell) + 1 and part[: len(shell)] == shell:
            shell_form = True
    return Command(argv, tuple(entrypoint) if entrypoint is not None else None,
                   tuple(cmd) if cmd is not None else None, shell_form)


def parse_env(items: Sequence[Any] | None) -> dict[str, str]:
    """The image's Env list as a mapping; later duplicates win, an item without ``=`` has an empty value."""
    env: dict[str, str] = {}
    for item in items or ():
        text = str(item)
        name, sep, value = text.partition("=")
        if name:
            env[name] = value if sep else ""
    return env


def search_path(env: Mapping[str, str]) -> tuple[str, ...]:
    """The directories a bare command name is looked up in: the image's PATH, else Docker's default."""
    path = env.get("PATH")
    if path is None:
        path = DEFAULT_PATH
    return tuple(path.split(":"))


def working_dir(config: Mapping[str, Any]) -> tuple[str, bool]:
    """The container's working directory and whether the config's value was a valid absolute path.

    Docker starts in ``/`` when WorkingDir is empty and refuses a relative one; sconify reads a relative
    one as relative to ``/`` and reports it.
    """
    raw = str(config.get("WorkingDir") or "")
    if not raw:
        return "/", True
    return posixpath.normpath(posixpath.join("/", raw)), raw.startswith("/")


def join_in_image(base: str, path: str) -> str:
    """``path`` made absolute against directory ``base`` inside the image, normalised lexically."""
    out = posixpath.normpath(posixpath.join(base, path))
    if out.startswith("//"):
        out = "/" + out.lstrip("/")
    return out


@dataclass(frozen=True)
class PasswdEntry:
    """One line of ``/etc/passwd``."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


@dataclass(frozen=True)
class GroupEntry:
    """One line of ``/etc/group``."""

    name: str
    gid: int
    members: tuple[str, ...]


def parse_passwd(text: str | None) -> list[PasswdEntry]:
    """The well-formed lines of an ``/etc/passwd`` text (others are skipped, as libc does)."""
    out = []
    for line in (text or "").splitlines():
        parts = line.split(":")
        if len(parts) < 7 or line.startswith("#"):
            continue
        try:
            out.append(PasswdEntry(parts[0], int(parts[2]), int(parts[3]), parts[5], parts[6]))
        except ValueError:
            continue
    return out


def parse_group(text: str | None) -> list[GroupEntry]:
    """The well-formed lines of an ``/etc/group`` text."""
    out = []
    for line in (text or "").splitlines():
        parts = line.split(":")
        if len(parts) < 4 or line.startswith("#"):
            continue
        try:
            out.append(GroupEntry(parts[0], int(parts[2]), tuple(m for m in parts[3].split(",") if m)))
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class User:
    """The identity the container's process runs as, resolved as runc resolves the image's USER."""

    spec: str  # the config's User, as written
    uid: int | None
    gid: int | None
    name: str | None
    group: str | None
    home: str
    additional_gids: tuple[int, ...] = ()
    problem: str | None = None  # why Docker would refuse to start the container

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "uid": self.uid,
            "gid": self.gid,
            "name": self.name,
            "group": self.group,
            "home": self.home,
            "additional_gids": list(self.additional_gids),
        }


def _is_number(text: str) -> bool:
    return text.isdigit()


def resolve_user(spec: str | None, passwd_text: str | None, group_text: str | None) -> User:
    """The uid, gid, home and supplementary groups of USER ``spec`` in an image with these passwd/group files.

    As runc does: an empty USER is root; a numeric uid absent from passwd runs with gid 0 and home ``/``;
    a user or group name absent from the files stops the container from starting.
    """
    spec = (spec or "").strip()
    users = parse_passwd(passwd_text)
    groups = parse_group(group_text)
    user_part, _, group_part = spec.partition(":")
    uid: int | None = 0
    gid: int | None = 0
    name: str | None = None
    home = "/"
    problem = None
    entry: PasswdEntry | None = None
    if not user_part:
        entry = next((u for u in users if u.uid == 0), None)
    elif _is_number(user_part):
        uid = int(user_part)
        entry = next((u for u in users if u.uid == uid), None)
    else:
        entry = next((u for u in users if u.name == user_part), None)
        if entry is None:
            where = "the image's /etc/passwd" if passwd_text is not None else "the image, which has no /etc/passwd"
            problem = f"the image's USER {user_part!r} is not in {where}, so Docker cannot start it"
            uid = gid = None
    if entry is not None:
        uid, gid, name, home = entry.uid, entry.gid, entry.name, entry.home or "/"
    group_name: str | None = None
    if group_part:
        if _is_number(group_part):
            gid = int(group_part)
            group_name = next((g.name for g in groups if g.gid == gid), None)
        else:
            found = next((g for g in groups if g.name == group_part), None)
            if found is None:
                problem = problem or f"the image's USER group {group_part!r} is not in the image's /etc/group"
                gid = None
            else:
                gid, group_name = found.gid, found.name
    elif gid is not None:
        group_name = next((g.name for g in groups if g.gid == gid), None)
    extra: tuple[int, ...] = ()
    if name and not group_part:
        # Supplementary groups come from /etc/group membership (only when no group is forced).
        extra = tuple(sorted({g.gid for g in groups if name in g.members and g.gid != gid}))
    return User(spec, uid, gid, name, group_name, home, extra, problem)
