"""FileTree.resolve: symbolic links inside the image root, as the kernel resolves them in a container."""

from __future__ import annotations

import pytest

from sconify.errors import NotFoundError
from sconify.image.tarfs import Entry
from sconify.image.tree import MAX_SYMLINK_HOPS, FileTree, SymlinkLoopError, merge


@pytest.fixture
def tree() -> FileTree:
    return merge([[
        Entry.directory("usr/bin"),
        Entry.file("usr/bin/busybox", 0, mode=0o755),
        Entry.symlink("bin", "usr/bin"),
        Entry.symlink("usr/bin/sh", "busybox"),
        Entry.symlink("usr/bin/abs", "/usr/bin/busybox"),
        Entry.symlink("usr/bin/up", "../../../../../../usr/bin/busybox"),  # '..' stops at the root
        Entry.symlink("usr/bin/dotted", "./../bin/./sh"),
        Entry.symlink("lib", "/usr/lib"),  # dangling
        Entry.file("etc/passwd", 0),
        Entry.symlink("etc/escape", "../../../etc/passwd"),
        Entry.symlink("loop-a", "loop-b"),
        Entry.symlink("loop-b", "/loop-a"),
        Entry.symlink("self", "self"),
        Entry.symlink("through-file", "etc/passwd/x"),
    ]])


def test_links_resolve_inside_the_root(tree: FileTree) -> None:
    assert tree.resolve("/bin/sh") == "usr/bin/busybox"
    assert tree.resolve("bin/abs") == "usr/bin/busybox"
    assert tree.resolve("/usr/bin/up") == "usr/bin/busybox"
    assert tree.resolve("/usr/bin/dotted") == "usr/bin/busybox"
    assert tree.resolve("/etc/escape") == "etc/passwd"
    assert tree.resolve("/../../bin/./sh") == "usr/bin/busybox"
    assert tree.resolve("/") == ""


def test_follow_final_and_missing_last_components(tree: FileTree) -> None:
    assert tree.resolve("/bin/sh", follow_final=False) == "usr/bin/sh"
    assert tree.resolve("/bin", follow_final=False) == "bin"
    assert tree.resolve("/bin/", follow_final=False) == "usr/bin"  # a trailing slash follows the link
    assert tree.resolve("/lib") == "usr/lib"  # dangling: the path it names, which does not exist
    assert tree.lookup("/lib") is None
    node = tree.lookup("/bin/sh")
    assert node is not None and node.path == "usr/bin/busybox"
    link = tree.lookup("/bin/sh", follow_final=False)
    assert link is not None and link.entry.linkname == "busybox"


def test_missing_and_non_directory_components(tree: FileTree) -> None:
    with pytest.raises(NotFoundError, match="/lib/libc.so cannot be resolved.*/usr/lib does not exist"):
        tree.resolve("/lib/libc.so")
    with pytest.raises(NotFoundError, match="/etc/passwd is not a directory"):
        tree.resolve("/through-file")
    assert tree.lookup("/nope/deeper") is None


def test_loops_end_with_a_clear_error(tree: FileTree) -> None:
    for path in ("/loop-a", "/self", "/loop-b/x"):
        with pytest.raises(SymlinkLoopError, match=f"{path} cannot be resolved.*more than 40 symbolic links"):
            tree.resolve(path)
    with pytest.raises(SymlinkLoopError):
        tree.lookup("/self")
    assert tree.resolve("/self", follow_final=False) == "self"


def test_forty_links_are_fine_and_forty_one_are_not() -> None:
    def chain(length: int) -> FileTree:
        entries = [Entry.file("target", 0)]
        entries += [Entry.symlink(f"l{i}", f"l{i + 1}" if i + 1 < length else "target") for i in range(length)]
        return merge([entries])

    assert chain(MAX_SYMLINK_HOPS).resolve("l0") == "target"
    with pytest.raises(SymlinkLoopError):
        chain(MAX_SYMLINK_HOPS + 1).resolve("l0")
