"""A read-only view of an image for the analysis: the merged tree plus the file contents fetched so far.

The analysis runs in rounds: when it asks for the content of a file nobody has read yet, the view records
the wish and answers None; the driver then fetches every recorded file in one batch and runs the analysis
again. Paths here are absolute image paths (``/etc/passwd``); the tree's own form has no leading slash.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping

from sconify.analyze.elf import ElfInfo
from sconify.analyze.files import FileContent
from sconify.errors import NotFoundError
from sconify.image.tarfs.entry import EntryKind
from sconify.image.tree import FileTree, Node, SymlinkLoopError

MAX_HOPS = 40


def rel(path: str) -> str:
    """The tree's form of an absolute image path."""
    return path.strip("/")


def absolute(path: str) -> str:
    """The absolute form of a tree path."""
    return "/" + path.strip("/")


class ImageView:
    """File system questions about one image, answered from its merged tree and fetched contents."""

    def __init__(self, tree: FileTree, contents: Mapping[tuple[int, str], FileContent]) -> None:
        self.tree = tree
        self.contents = contents
        self.wants: set[tuple[int, str]] = set()

    # -- the tree -------------------------------------------------------------------------------------------

    def resolve(self, path: str, strict: bool = False) -> str | None:
        """The absolute path after following every symlink, or None if a directory on the way is missing or
        the links loop (``strict``: raise SymlinkLoopError for a loop)."""
        try:
            return absolute(self.tree.resolve(rel(path)))
        except SymlinkLoopError:
            if strict:
                raise
            return None
        except NotFoundError:
            return None

    def node(self, path: str, follow: bool = True) -> Node | None:
        """The node at ``path`` (after links if ``follow``), or None; a loop counts as absent."""
        try:
            return self.tree.lookup(rel(path), follow_final=follow)
        except NotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return self.node(path) is not None

    def is_dir(self, path: str) -> bool:
        node = self.node(path)
        return node is not None and node.kind is EntryKind.DIRECTORY

    def is_file(self, path: str) -> bool:
        node = self.node(path)
        return node is not None and node.kind in (EntryKind.REGULAR, EntryKind.HARDLINK)

    def listdir(self, path: str) -> list[str]:
        """Names in a directory (after links), or [] when it is not one."""
        real = self.resolve(path)
        if real is None:
            return []
        try:
            return self.tree.children(rel(real))
        except NotFoundError:
            return []

    def glob(self, pattern: str) -> list[str]:
        """Absolute paths matching a pattern whose wildcards are in the last component only."""
        parent, name = posixpath.split(pattern)
        if not any(c in name for c in "*?["):
            return [pattern] if self.exists(pattern) else []
        return [posixpath.join(parent, n) for n in self.listdir(parent) if fnmatch.fnmatchcase(n, name)]

    def follow(self, path: str) -> tuple[str, list[tuple[str, str]]]:
        """Resolve ``path`` recording each symlink of its last component as (link path, target).

        Directories on the way are resolved silently. Raises SymlinkLoopError after 40 links, NotFoundError
        when a directory on the way is missing.
        """
        hops: list[tuple[str, str]] = []
        current = posixpath.normpath(path)
        for _ in range(MAX_HOPS + 1):
            parent, name = posixpath.split(current)
            try:
                real_parent = absolute(self.tree.resolve(rel(parent)))
            except SymlinkLoopError:
                raise SymlinkLoopError(f"{path} leads into a loop of symbolic links in its directories, which the "
                                       f"kernel gives up on after {MAX_HOPS} links") from None
            candidate = posixpath.join(real_parent, name) if name else real_parent
            node = self.tree.get(rel(candidate))
            if node is None or node.kind is not EntryKind.SYMLINK:
                return candidate, hops
            target = node.entry.linkname
            hops.append((candidate, target))
            current = posixpath.normpath(target if target.startswith("/") else posixpath.join(real_parent, target))
            if not current.startswith("/"):
                current = "/" + current
        loop: list[str] = []
        for link, _target in hops:
            if link in loop:
                break
            loop.append(link)
            if len(loop) == 6:
                break
        shown = " -> ".join([*loop, hops[len(loop)][0] if len(loop) < len(hops) else "..."])
        raise SymlinkLoopError(f"{path} leads into a loop of symbolic links ({shown}), which the kernel gives up on "
                               f"after {MAX_HOPS} links")

    # -- contents -------------------------------------------------------------------------------------------

    def _content(self, path: str, need_full: bool) -> FileContent | None:
        real = self.resolve(path)
        if real is None:
            return None
        node = self.tree.get(rel(real))
        if node is None:
            return None
        source = self.tree.content_source(rel(real))
        if source is None:
            return None
        if node.kind is EntryKind.REGULAR and node.entry.size == 0:
            return FileContent(0, b"", b"")
        key = (source[1], source[0])
        found = self.contents.get(key)
        if found is not None and (found.complete or not need_full):
            return found
        if found is not None and found.size == 0:
            return FileContent(0, b"", b"")
        self.wants.add(key)
        return None

    def head(self, path: str) -> bytes | None:
        """The first bytes of a file (None: not a file, or not read yet and now wanted)."""
        found = self._content(path, need_full=False)
        return found.head if found is not None else None

    def content(self, path: str) -> FileContent | None:
        """Everything read of a file (None: not a file, or not read yet and now wanted)."""
        return self._content(path, need_full=True)

    def text(self, path: str) -> str | None:
        """A small text file's content (None: absent, too large, binary, or not read yet and now wanted)."""
        found = self.content(path)
        if found is None or found.text is None:
            return None
        return found.text.decode("utf-8", "replace")

    def elf(self, path: str) -> ElfInfo | None:
        found = self.content(path)
        return found.elf if found is not None else None

    def pending(self, path: str) -> bool:
        """Whether ``path``'s content was asked for and is not read yet."""
        real = self.resolve(path)
        if real is None:
            return False
        source = self.tree.content_source(rel(real))
        return source is not None and (source[1], source[0]) in self.wants
