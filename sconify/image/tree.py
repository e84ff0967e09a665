"""The merged file tree of an image: its layers' entries applied in order with OCI whiteout semantics.

The tree holds one small record per path (the Entry and the index of the layer that supplied it), never
content, and resolves symbolic links inside the image root the way the kernel would inside a container.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass

from sconify.errors import NotFoundError
from sconify.image.model import Image, Layer
from sconify.image.tarfs.entry import Entry, EntryKind, encode_name, split_path
from sconify.image.tarfs.reader import DEFAULT_MAX_SIZE, read_layer

log = logging.getLogger(__name__)

MAX_SYMLINK_HOPS = 40  # Linux's limit before ELOOP
_IMPLICIT_DIR_MODE = 0o755  # what Docker and containerd give a parent directory no layer lists


class SymlinkLoopError(NotFoundError):
    """A path cannot be resolved because it follows more symbolic links than the kernel would (ELOOP)."""


@dataclass(frozen=True, slots=True)
class Node:
    """One path of the merged tree: its entry and the index of the layer that supplied it.

    ``implicit`` marks a directory that no layer listed but that a listed descendant needs (it gets mode
    0755 and owner 0:0, as runtimes create it). ``origin`` is, for a hard link, the ``(path, layer)`` of the
    member whose data it shares, as it was when the link's layer was applied; None for other kinds or
    when the target did not exist.
    """

    entry: Entry
    layer: int
    implicit: bool = False
    origin: tuple[str, int] | None = None

    @property
    def path(self) -> str:
        return self.entry.path

    @property
    def kind(self) -> EntryKind:
        return self.entry.kind


def _name_key(name: str) -> bytes:
    return encode_name(name)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _clean(path: str) -> str:
    """A caller's path ("/etc/passwd", "./etc//passwd", "etc/passwd") in the tree's form, without resolving."""
    return "/".join(p for p in path.split("/") if p not in ("", "."))


class FileTree:
    """Path -> Node for a whole image; the root is ``""`` and always a directory."""

    def __init__(self) -> None:
        root = Entry("", EntryKind.DIRECTORY, mode=_IMPLICIT_DIR_MODE)
        self._nodes: dict[str, Node] = {"": Node(root, 0, implicit=True)}
        self._children: dict[str, set[str]] = {"": set()}
        self.layers = 0

    # -- reading ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and _clean(path) in self._nodes

    def __getitem__(self, path: str) -> Node:
        return self._nodes[_clean(path)]

    def __iter__(self) -> Iterator[str]:
        return (node.path for node in self.walk())

    def get(self, path: str) -> Node | None:
        """The node at ``path`` taken literally (no link in it is followed), or None."""
        return self._nodes.get(_clean(path))

    def get_entry_path(self, path: str) -> Node | None:
        """``get`` for a path already in a layer entry's normal form (``usr/lib/x``; the root is "")."""
        return self._nodes.get(path)

    def lookup(self, path: str, follow_final: bool = True) -> Node | None:
        """The node at ``path`` after resolving symbolic links, or None if it does not exist."""
        try:
            return self._nodes.get(self.resolve(path, follow_final))
        except SymlinkLoopError:
            raise
        except NotFoundError:
            return None

    def children(self, path: str = "") -> list[str]:
        """The names in directory ``path`` (taken literally), sorted by their bytes."""
        clean = _clean(path)
        names = self._children.get(clean)
        if names is None:
            what = "does not exist" if clean not in self._nodes else "is not a directory"
            raise NotFoundError(f"/{clean} {what} in the image, so it has no children to list.")
        return sorted(names, key=_name_key)

    def walk(self, top: str = "") -> Iterator[Node]:
        """``top`` and every node below it, depth first, each directory's names sorted by their bytes."""
        clean = _clean(top)
        node = self._nodes.get(clean)
        if node is None:
            raise NotFoundError(f"/{clean} does not exist in the image, so there is nothing to walk.")
        stack = [clean]
        while stack:
            path = stack.pop()
            yield self._nodes[path]
            names = self._children.get(path)
            if names:
                stack.extend(_join(path, name) for name in sorted(names, key=_name_key, reverse=True))

    def resolve(self, path: str, follow_final: bool = True) -> str:
        """The path ``path`` names after following symbolic links inside the image root.

        Absolute link targets start again at the image root and ``..`` stops at the root, as in a container.
        The last component may be missing (the result then names a path that does not exist); a missing or
        non-directory component before it raises NotFoundError, more than 40 links SymlinkLoopError.
        """
        follow_final = follow_final or path.endswith("/")
        todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        current: list[str] = []
        hops: list[str] = []
        while todo:
            part = todo.pop()
            if part == "..":
                if current:
                    current.pop()
                continue
            candidate = "/".join([*current, part])
            node = self._nodes.get(candidate)
            last = not todo
            if node is None:
                if not last:
                    raise NotFoundError(f"{path} cannot be resolved in the image: /{candidate} does not exist.")
                current.append(part)
                continue
            if node.entry.kind is EntryKind.SYMLINK and (follow_final or not last):
                hops.append(f"/{candidate} -> {node.entry.linkname}")
                if len(hops) > MAX_SYMLINK_HOPS:
                    raise SymlinkLoopError(
                        f"{path} cannot be resolved in the image: it follows more than {MAX_SYMLINK_HOPS} symbolic "
                        f"links (a loop through {'; '.join(hops[:4])}); fix the links in the image."
                    )
                target = node.entry.linkname
                if target.startswith("/"):
                    current = []
                todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                continue
            if not last and node.entry.kind is not EntryKind.DIRECTORY:
                raise NotFoundError(f"{path} cannot be resolved in the image: /{candidate} is not a directory.")
            current.append(part)
        return "/".join(current)

    def content_source(self, path: str) -> tuple[str, int] | None:
        """Where the data of the regular file or hard link at ``path`` lives: ``(member path, layer index)``."""
        node = self.get(path)
        if node is None:
            return None
        if node.entry.kind is EntryKind.HARDLINK:
            return node.origin
        if node.entry.kind is EntryKind.REGULAR:
            return node.path, node.layer
        return None

    # -- building --------------------------------------------------------------------------------------------

    def add_layer(self, entries: Iterable[Entry]) -> int:
        """Apply the next layer on top; returns its index.

        Whiteouts and opaque markers act on the lower layers only, wherever they stand in the layer, so the
        layer's entries are gathered first (small records, no content).
        """
        layer = self.layers
        members: list[Entry] = []
        for entry in entries:
            if not entry.is_overlay_marker:
                members.append(entry)
            elif entry.is_opaque:
                self._clear(entry.parent)
            elif entry.is_whiteout:
                target = entry.whiteout_target
                assert target is not None
                self._delete(target)
            elif entry.is_whiteout_meta:
                log.debug("AUFS bookkeeping %r in layer %d skipped", entry.path, layer)
            else:
                members.append(entry)
        # Deleting lower entries first is only right if no member of this layer was added yet; members wait.
        for entry in members:
            self._add(entry, layer)
        self.layers += 1
        return layer

    def _delete(self, path: str) -> None:
        node = self._nodes.get(path)
        if node is None or path == "":
            return
        self._clear(path)
        self._children.pop(path, None)
        del self._nodes[path]
        parent, name = split_path(path)
        self._children[parent].discard(name)

    def _clear(self, directory: str) -> None:
        """Delete everything below ``directory``, which stays."""
        names = self._children.get(directory)
        if not names:
            return
        stack = [_join(directory, name) for name in names]
        names.clear()
        while stack:
            path = stack.pop()
            below = self._children.pop(path, None)
            if below:
                stack.extend(_join(path, name) for name in below)
            self._nodes.pop(path, None)

    def _ensure_dir(self, path: str, layer: int) -> None:
        node = self._nodes.get(path)
        if node is not None and node.entry.kind is EntryKind.DIRECTORY:
            return
        parent, name = split_path(path)
        self._ensure_dir(parent, layer)
        if node is not None:
            # A directory over a lower non-directory: overlay file systems show the directory.
            log.warning(
                "layer %d puts entries under /%s, which is a %s; it becomes a directory", layer, path, node.entry.kind
            )
        self._nodes[path] = Node(Entry(path, EntryKind.DIRECTORY, mode=_IMPLICIT_DIR_MODE), layer, implicit=True)
        self._children[path] = set()
        self._children[parent].add(name)

    def _add(self, entry: Entry, layer: int) -> None:
        path = entry.path
        if path == "":
            self._nodes[""] = Node(entry, layer)
            return
        parent, name = split_path(path)
        self._ensure_dir(parent, layer)
        existing = self._nodes.get(path)
        is_dir = entry.kind is EntryKind.DIRECTORY
        if existing is not None and existing.entry.kind is EntryKind.DIRECTORY and not is_dir:
            self._clear(path)
            del self._children[path]
        origin = self._origin(entry, layer) if entry.kind is EntryKind.HARDLINK else None
        self._nodes[path] = Node(entry, layer, origin=origin)
        if is_dir and path not in self._children:
            self._children[path] = set()
        self._children[parent].add(name)

    def _origin(self, entry: Entry, layer: int) -> tuple[str, int] | None:
        target = self._nodes.get(entry.linkname)
        if target is None:
            try:  # link(2) follows links in the target's directories
                parent, name = split_path(entry.linkname)
                target = self._nodes.get(_join(self.resolve(parent), name) if parent else name)
            except NotFoundError:
                target = None
        if target is None:
            log.warning(
                "layer %d has the hard link /%s to /%s, which does not exist there", layer, entry.path, entry.linkname
            )
            return None
        if target.entry.kind is EntryKind.HARDLINK:
            return target.origin
        return target.path, target.layer


def merge(layers: Iterable[Iterable[Entry]]) -> FileTree:
    """The merged tree of layers given lowest first, with OCI whiteout and opaque-directory semantics."""
    tree = FileTree()
    for entries in layers:
        tree.add_layer(entries)
    return tree


def layer_entries(layer: Layer, what: str, max_size: int = DEFAULT_MAX_SIZE) -> Iterator[Entry]:
    """The entries of one layer of an image, its blob verified as it streams; contents are skipped."""
    with closing(layer.open_tar()) as stream:
        for entry, _ in read_layer(stream, what=what, max_size=max_size, needed=lambda _: False):
            yield entry


def image_tree(image: Image, max_size: int = DEFAULT_MAX_SIZE) -> FileTree:
    """The merged file tree of an image, reading each layer once, verified against its digest and DiffID."""
    name = image.name or "the image"
    return merge(
        layer_entries(layer, f"layer {index} ({layer.descriptor.digest}) of {name}", max_size)
        for index, layer in enumerate(image.layers)
    )
