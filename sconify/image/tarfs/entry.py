"""One tar member as the OCI layer spec sees it: normalised path, kind, owner, mode, time, links, xattrs."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"

# PAX keywords that Entry represents by its own fields (or drops, like atime and ctime, which a layer
# must not depend on); everything else a reader meets stays in Entry.pax.
PAX_FIELD_KEYWORDS = frozenset(
    {"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "atime", "ctime", "hdrcharset",
     "SCHILY.devmajor", "SCHILY.devminor"}
)
XATTR_PREFIX = "SCHILY.xattr."
SPARSE_PREFIX = "GNU.sparse."


class EntryKind(enum.StrEnum):
    """The kinds of file a layer can hold."""

    REGULAR = "regular"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


def encode_name(text: str) -> bytes:
    """The exact bytes of a path or name kept as ``str`` (non-UTF-8 bytes survive as surrogate escapes)."""
    return text.encode("utf-8", "surrogateescape")


def decode_name(raw: bytes) -> str:
    """The ``str`` form of path or name bytes; ``encode_name`` gives back the same bytes."""
    return raw.decode("utf-8", "surrogateescape")


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a normalised in-image path, or None if it is one ("" is the image root)."""
    # The common case first: no component is empty or starts with "." (so none is ".", ".." or a whiteout).
    if path and path[0] != "/" and path[-1] != "/" and "//" not in path and "/." not in path and path[0] != "." \
            and "\0" not in path:
        return None
    return _path_problem(path)


def _path_problem(path: str) -> str | None:
    """``path_problem`` component by component, without the shortcut."""
    if "\0" in path:
        return "contains a NUL character"
    if path == "":
        return None
    if path.startswith("/"):
        return "is absolute"
    for part in path.split("/"):
        if part == "..":
            return "has a '..' component"
        if part in ("", "."):
            return "is not normalised (empty or '.' component, or a trailing '/')"
    base = path.rsplit("/", 1)[-1]
    if base.startswith(WHITEOUT_PREFIX) and not base.startswith(WHITEOUT_META_PREFIX):
        if base[len(WHITEOUT_PREFIX):] in ("", ".", ".."):
            return "is a whiteout of an empty name, '.' or '..'"
    return None


def split_path(path: str) -> tuple[str, str]:
    """``(parent, name)`` of a normalised path; the parent of a top-level path is the root ""."""
    parent, _, name = path.rpartition("/")
    return parent, name


def path_sort_key(path: str) -> tuple[bytes, ...]:
    """Sort key for normalised paths: component by component on the bytes, so parents come before children
    and each directory's subtree stays together (like GNU tar's ``--sort=name``)."""
    if not path:
        return ()
    return tuple(encode_name(part) for part in path.split("/"))


@dataclass(frozen=True, slots=True)
class Entry:
    """One layer member: everything a layer records about a file except its content.

    ``path`` is relative to the image root, ``/``-separated, without a leading ``/`` or ``./`` or a trailing
    ``/``; the root itself is ``""``. Names are ``str`` with non-UTF-8 bytes kept as surrogate escapes, so
    ``encode_name(entry.path)`` gives back the bytes of the archive. ``mtime`` is a Decimal so that sub-second
    PAX times survive exactly. ``xattrs`` holds the PAX ``SCHILY.xattr.*`` records, ``pax`` every other PAX
    record the archive had (except atime and ctime, which are dropped); both are read-only by convention.
    """

    path: str
    kind: EntryKind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: Decimal = Decimal(0)
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict, hash=False)
    pax: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Programming errors (a caller building an entry by hand) are ValueErrors; the reader checks
        # untrusted archives itself first and reports them as UnsafeArchiveError or IntegrityError.
        problem = path_problem(self.path)
        if problem:
            raise ValueError(f"entry path {self.path!r} {problem}")
        kind = EntryKind(self.kind)
        if kind is not self.kind:
            object.__setattr__(self, "kind", kind)
        if self.path == "" and kind is not EntryKind.DIRECTORY:
            raise ValueError("the image root can only be a directory entry")
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(f"entry {self.path!r} has mode {self.mode:o}; only permission bits (07777) belong here")
        if self.uid < 0 or self.gid < 0 or self.devmajor < 0 or self.devminor < 0:
            raise ValueError(f"entry {self.path!r} has a negative owner or device number")
        if self.size < 0 or (self.size and kind is not EntryKind.REGULAR):
            raise ValueError(f"entry {self.path!r} of kind {kind} cannot have size {self.size}")
        if not isinstance(self.mtime, Decimal):
            object.__setattr__(self, "mtime", Decimal(self.mtime))
        if not self.mtime.is_finite():
            raise ValueError(f"entry {self.path!r} has a non-finite mtime")
        if kind is EntryKind.HARDLINK:
            problem = path_problem(self.linkname)
            if problem or not self.linkname:
                raise ValueError(f"hard link {self.path!r} has target {self.linkname!r}, which {problem or 'is empty'}")
        elif kind is EntryKind.SYMLINK:
            if not self.linkname or "\0" in self.linkname:
                raise ValueError(f"symlink {self.path!r} has an empty target or one with a NUL")
        elif self.linkname:
            raise ValueError(f"entry {self.path!r} of kind {kind} cannot have a link target")
        for key, value in self.pax.items():
            if not value:  # in PAX an empty value unsets a keyword, so it cannot be stored
                raise ValueError(f"PAX record {key!r} of {self.path!r} has an empty value")
            if key in PAX_FIELD_KEYWORDS or key.startswith((XATTR_PREFIX, SPARSE_PREFIX)):
                raise ValueError(f"PAX record {key!r} of {self.path!r} belongs in an Entry field, not in pax")
            if "=" in key or "\0" in key or not key:
                raise ValueError(f"PAX keyword {key!r} of {self.path!r} is malformed")
        for name in self.xattrs:
            if "=" in name or "\0" in name or not name:
                raise ValueError(f"xattr name {name!r} of {self.path!r} is malformed")

    def __repr__(self) -> str:
        parts = [repr(self.path), self.kind.value, f"mode=0o{self.mode:o}", f"owner={self.uid}:{self.gid}"]
        if self.uname or self.gname:
            parts.append(f"names={self.uname}:{self.gname}")
        parts.append(f"mtime={self.mtime}")
        if self.size:
            parts.append(f"size={self.size}")
        if self.linkname:
            parts.append(f"linkname={self.linkname!r}")
        if self.kind in (EntryKind.CHAR, EntryKind.BLOCK):
            parts.append(f"dev={self.devmajor},{self.devminor}")
        if self.xattrs:
            parts.append(f"xattrs={dict(self.xattrs)!r}")
        if self.pax:
            parts.append(f"pax={dict(self.pax)!r}")
        return f"Entry({', '.join(parts)})"

    # -- convenience constructors for callers that build layers --------------------------------------------

    @classmethod
    def file(cls, path: str, size: int, mode: int = 0o644, **kw: Any) -> Entry:
        """A regular file entry."""
        return cls(path, EntryKind.REGULAR, mode=mode, size=size, **kw)

    @classmethod
    def directory(cls, path: str, mode: int = 0o755, **kw: Any) -> Entry:
        """A directory entry."""
        return cls(path, EntryKind.DIRECTORY, mode=mode, **kw)

    @classmethod
    def symlink(cls, path: str, target: str, **kw: Any) -> Entry:
        """A symbolic link; ``target`` is kept as given (absolute and ``..`` targets are normal in images)."""
        kw.setdefault("mode", 0o777)
        return cls(path, EntryKind.SYMLINK, linkname=target, **kw)

    @classmethod
    def hardlink(cls, path: str, target: str, **kw: Any) -> Entry:
        """A hard link to ``target``, a normalised path in the same image."""
        return cls(path, EntryKind.HARDLINK, linkname=target, **kw)

    @classmethod
    def whiteout(cls, target: str, **kw: Any) -> Entry:
        """The whiteout that deletes ``target`` (and everything under it) from the layers below."""
        parent, name = split_path(target)
        return cls.file(f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name, 0, **kw)

    @classmethod
    def opaque(cls, directory: str, **kw: Any) -> Entry:
        """The marker that hides the lower layers' contents of ``directory``."""
        return cls.file(f"{directory}/{OPAQUE_MARKER}" if directory else OPAQUE_MARKER, 0, **kw)

    # -- derived facts ---------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The last path component ("" for the root)."""
        return split_path(self.path)[1]

    @property
    def parent(self) -> str:
        """The path of the directory holding this entry ("" for top-level entries)."""
        return split_path(self.path)[0]

    @property
    def is_overlay_marker(self) -> bool:
        """Whether this is overlay bookkeeping of any kind (a whiteout, the opaque marker or AUFS metadata): its
        name starts with ``.wh.``. One test for the many entries that are none of them."""
        return self.path.rpartition("/")[2].startswith(WHITEOUT_PREFIX)

    @property
    def is_whiteout(self) -> bool:
        """Whether this is a ``.wh.NAME`` file that deletes NAME from the lower layers (not the opaque marker)."""
        base = self.name
        return base.startswith(WHITEOUT_PREFIX) and not base.startswith(WHITEOUT_META_PREFIX)

    @property
    def is_opaque(self) -> bool:
        """Whether this is the ``.wh..wh..opq`` marker that hides the lower contents of its directory."""
        return self.name == OPAQUE_MARKER

    @property
    def is_whiteout_meta(self) -> bool:
        """Whether this is other ``.wh..wh.*`` bookkeeping (AUFS), which runtimes skip."""
        return self.name.startswith(WHITEOUT_META_PREFIX) and not self.is_opaque

    @property
    def whiteout_target(self) -> str | None:
        """The path a whiteout deletes, the directory an opaque marker applies to, else None."""
        if self.is_opaque:
            return self.parent
        if self.is_whiteout:
            parent = self.parent
            name = self.name[len(WHITEOUT_PREFIX):]
            return f"{parent}/{name}" if parent else name
        return None

    @property
    def path_bytes(self) -> bytes:
        """The exact bytes of the path."""
        return encode_name(self.path)

    def sort_key(self) -> tuple[bytes, ...]:
        """Key that orders entries by path bytes, parents before children."""
        return path_sort_key(self.path)


def sorted_entries(entries: Iterable[Entry]) -> list[Entry]:
    """Entries in the order new layers are written in: by path bytes, parents before children."""
    return sorted(entries, key=Entry.sort_key)


def entry_sort_key(entry: Entry) -> tuple[bytes, ...]:
    """The key ``sorted_entries`` uses; for callers who sort ``(entry, content)`` pairs themselves."""
    return path_sort_key(entry.path)
