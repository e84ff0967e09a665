"""extract: nothing lands outside the destination, metadata is applied, whiteouts act across layers."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest

from sconify.errors import UnsafeArchiveError
from sconify.image.tarfs import Entry, EntryKind, LayerWriter, decode_name, extract, read_layer
from sconify.image.tree import merge

ROOT = os.geteuid() == 0


def _layer(items: list[tuple[Entry, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with LayerWriter(out) as writer:
        for entry, content in items:
            writer.add(entry, content)
    return out.getvalue()


def _snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``path`` with its mode and content (or link target), to prove nothing changed."""
    out = {}
    for item in sorted(path.rglob("*")):
        st = item.lstat()
        data = os.readlink(item).encode() if item.is_symlink() else item.read_bytes() if item.is_file() else b""
        out[item.relative_to(path).as_posix()] = (st.st_mode, data)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the destination that an attacker would love to write into."""
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "secret").write_bytes(b"keep me")
    return victim


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    target = tmp_path / "dest"
    target.mkdir()
    return target


def test_planted_symlink_is_never_followed(dest: Path, outside: Path) -> None:
    before = _snapshot(outside)
    layer = _layer([
        (Entry.symlink("a", str(outside)), None),
        (Entry.file("a/x", 4), b"evil"),
        (Entry.symlink("b", str(outside / "secret")), None),
        (Entry.file("b", 3), b"new"),
        (Entry.symlink("c", "../outside"), None),
        (Entry.file("c/secret", 6), b"gotcha"),
    ])
    extract(io.BytesIO(layer), dest)
    assert _snapshot(outside) == before
    assert not (dest / "a").is_symlink() and (dest / "a" / "x").read_bytes() == b"evil"
    assert not (dest / "b").is_symlink() and (dest / "b").read_bytes() == b"new"
    assert (dest / "c" / "secret").read_bytes() == b"gotcha"


def test_symlink_from_a_lower_layer_is_not_followed_either(dest: Path, outside: Path) -> None:
    before = _snapshot(outside)
    extract(io.BytesIO(_layer([(Entry.symlink("etc", str(outside)), None)])), dest)
    extract(io.BytesIO(_layer([(Entry.file("etc/secret", 5), b"pwned")])), dest)
    assert _snapshot(outside) == before
    assert (dest / "etc").is_dir() and (dest / "etc" / "secret").read_bytes() == b"pwned"


def test_hard_links_stay_inside(dest: Path, outside: Path) -> None:
    before = _snapshot(outside)
    # An absolute target is read relative to the root; there is no etc/passwd in dest, so it is refused.
    with pytest.raises(UnsafeArchiveError, match="'copy'.*not extracted yet"):
        extract(io.BytesIO(_layer([(Entry.hardlink("copy", "etc/passwd"), None)])), dest)
    # A hard link to a symlink that points outside links the symlink itself, not what it points at.
    extract(io.BytesIO(_layer([
        (Entry.symlink("s", str(outside / "secret")), None),
        (Entry.hardlink("h", "s"), None),
    ])), dest)
    assert (dest / "h").is_symlink() and (dest / "h").lstat().st_ino == (dest / "s").lstat().st_ino
    assert (outside / "secret").stat().st_nlink == 1
    # A hard link through a symlinked directory is refused rather than resolved.
    with pytest.raises(UnsafeArchiveError, match="'via'"):
        extract(io.BytesIO(_layer([
            (Entry.symlink("out", str(outside)), None),
            (Entry.hardlink("via", "out/secret"), None),
        ])), dest)
    assert _snapshot(outside) == before


def test_escaping_tar_never_writes_outside(dest: Path, outside: Path) -> None:
    hostile = io.BytesIO()
    with tarfile.open(fileobj=hostile, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("../outside/secret")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"pwned"))
    before = _snapshot(outside)
    with pytest.raises(UnsafeArchiveError):
        extract(io.BytesIO(hostile.getvalue()), dest)
    assert _snapshot(outside) == before and list(dest.iterdir()) == []


def test_metadata_is_applied(dest: Path) -> None:
    mtime = Decimal("1700000000.123456789")
    items: list[tuple[Entry, bytes | None]] = [
        (Entry.directory("", mode=0o750, mtime=7), None),
        (Entry.directory("bin", mode=0o711, mtime=mtime), None),
        (Entry.file("bin/tool", 4, mode=0o4755, mtime=mtime, uid=1234, gid=5678), b"tool"),
        (Entry.hardlink("bin/alias", "bin/tool"), None),
        (Entry.symlink("bin/sh", "/bin/tool", mtime=mtime), None),
        (Entry("run/fifo", EntryKind.FIFO, mode=0o620, mtime=mtime), None),
        (Entry("dev/null", EntryKind.CHAR, mode=0o666, devmajor=1, devminor=3), None),
        (Entry.directory("tmp", mode=0o1777, mtime=mtime), None),
        (Entry.file(decode_name(b"caf\xe9"), 1), b"c"),
        (Entry.directory("ro", mode=0o555), None),
        (Entry.file("ro/inside", 2, mode=0o444), b"ro"),
    ]
    report = extract(io.BytesIO(_layer(items)), dest, owners=True)
    ns = 1700000000_123456789
    tool = (dest / "bin/tool").lstat()
    assert (dest / "bin/tool").read_bytes() == b"tool"
    assert stat.S_IMODE(tool.st_mode) == 0o4755 and tool.st_mtime_ns == ns
    assert (dest / "bin/alias").lstat().st_ino == tool.st_ino
    sh = (dest / "bin/sh").lstat()
    assert stat.S_ISLNK(sh.st_mode) and os.readlink(dest / "bin/sh") == "/bin/tool" and sh.st_mtime_ns == ns
    fifo = (dest / "run/fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620 and fifo.st_mtime_ns == ns
    assert stat.S_IMODE((dest / "tmp").lstat().st_mode) == 0o1777 and (dest / "tmp").lstat().st_mtime_ns == ns
    assert stat.S_IMODE((dest / "bin").lstat().st_mode) == 0o711 and (dest / "bin").lstat().st_mtime_ns == ns
    assert stat.S_IMODE(dest.lstat().st_mode) == 0o750 and dest.lstat().st_mtime_ns == 7 * 10**9
    assert (dest / os.fsdecode(b"caf\xe9")).read_bytes() == b"c"
    assert (dest / "ro/inside").read_bytes() == b"ro" and stat.S_IMODE((dest / "ro").lstat().st_mode) == 0o555
    assert report.entries == len(items) - 1 and report.bytes == 4 + 1 + 2
    if ROOT:
        assert (tool.st_uid, tool.st_gid) == (1234, 5678)
        null = (dest / "dev/null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert report.skipped == ()
    else:
        assert report.skipped == ("dev/null",)


def test_owners_are_left_alone_unless_asked(dest: Path) -> None:
    extract(io.BytesIO(_layer([(Entry.file("f", 1, uid=1234, gid=5678), b"x")])), dest)
    assert ((dest / "f").lstat().st_uid, (dest / "f").lstat().st_gid) == (os.geteuid(), os.getegid())


@pytest.mark.skipif(not ROOT, reason="dropping privileges needs root")
def test_device_nodes_are_skipped_without_root() -> None:
    layer = _layer([(Entry("dev/null", EntryKind.CHAR, mode=0o666, devmajor=1, devminor=3), None),
                    (Entry.file("ok", 2), b"ok")])
    work = Path(tempfile.mkdtemp(prefix="sconify-extract-"))
    try:
        os.chmod(work, 0o755)  # mkdtemp makes it 0700, which nobody cannot enter
        (work / "dest").mkdir()
        os.chown(work / "dest", 65534, 65534)
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child drops to nobody and extracts; it reports through the pipe
            status = 1
            try:
                os.close(reader)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                report = extract(io.BytesIO(layer), work / "dest")
                os.write(writer, ",".join(report.skipped).encode())
                status = 0
            except BaseException as exc:
                os.write(writer, repr(exc).encode())
            finally:
                os._exit(status)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            skipped = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, skipped
        assert skipped == "dev/null"
        assert (work / "dest" / "ok").read_bytes() == b"ok" and not (work / "dest" / "dev" / "null").exists()
    finally:
        shutil.rmtree(work)


def _disk_matches_tree(dest: Path, layers: list[list[tuple[Entry, bytes | None]]]) -> None:
    """The extracted directory and the merged FileTree of the same layers agree path by path."""
    tree = merge([[e for e, _ in layer] for layer in layers])
    on_disk = {p.relative_to(dest).as_posix(): p.lstat() for p in dest.rglob("*")}
    in_tree = {node.path: node for node in tree.walk() if node.path}
    assert set(on_disk) == set(in_tree)
    for path, node in in_tree.items():
        st_ = on_disk[path]
        kind = node.entry.kind
        if kind is EntryKind.HARDLINK:
            assert node.origin is not None
            assert st_.st_ino == on_disk[node.origin[0]].st_ino
            continue
        expected = {
            EntryKind.DIRECTORY: stat.S_ISDIR, EntryKind.REGULAR: stat.S_ISREG, EntryKind.SYMLINK: stat.S_ISLNK,
            EntryKind.FIFO: stat.S_ISFIFO,
        }[kind]
        assert expected(st_.st_mode), path
        if kind is not EntryKind.SYMLINK:
            assert stat.S_IMODE(st_.st_mode) == node.entry.mode, path
        else:
            assert os.readlink(dest / path) == node.entry.linkname


def test_whiteouts_and_opaque_directories_across_layers(dest: Path) -> None:
    base: list[tuple[Entry, bytes | None]] = [
        (Entry.directory("etc"), None),
        (Entry.file("etc/passwd", 4), b"root"),
        (Entry.file("etc/shadow", 6, mode=0o600), b"secret"),
        (Entry.directory("opt/app/lib", mode=0o700), None),
        (Entry.file("opt/app/lib/old.so", 3), b"old"),
        (Entry.file("opt/app/keep", 4), b"keep"),
        (Entry.directory("var/cache"), None),
        (Entry.file("var/cache/a", 1), b"a"),
        (Entry.file("var/cache/b", 1), b"b"),
        (Entry.directory("dir-to-file"), None),
        (Entry.file("dir-to-file/child", 1), b"c"),
        (Entry.file("file-to-dir", 1), b"f"),
        (Entry.symlink("lib", "usr/lib"), None),
    ]
    upper: list[tuple[Entry, bytes | None]] = [
        (Entry.whiteout("etc/shadow"), None),
        (Entry.file("opt/app/lib/new.so", 3), b"new"),  # before the opaque marker: same layer, stays
        (Entry.opaque("opt/app/lib"), None),
        (Entry.whiteout("var/cache"), None),
        (Entry.file("var/cache/c", 1), b"c"),  # the whited-out directory comes back with only c
        (Entry.file("dir-to-file", 3), b"now"),
        (Entry.directory("file-to-dir", mode=0o711), None),
        (Entry.file("file-to-dir/x", 1), b"x"),
        (Entry.file("same-layer", 1), b"s"),
        (Entry.whiteout("same-layer"), None),  # a whiteout only acts on lower layers
        (Entry.file("lib/libc.so", 1), b"l"),  # under a lower symlink: becomes a directory, as overlayfs shows
        (Entry.hardlink("etc/passwd-link", "etc/passwd"), None),
        (Entry("run/fifo", EntryKind.FIFO), None),
    ]
    for layer in (base, upper):
        extract(io.BytesIO(_layer(layer)), dest)
    assert not (dest / "etc/shadow").exists()
    assert (dest / "etc/passwd").read_bytes() == b"root"
    assert sorted(os.listdir(dest / "opt/app/lib")) == ["new.so"]
    assert (dest / "opt/app/keep").exists()
    assert sorted(os.listdir(dest / "var/cache")) == ["c"]
    assert (dest / "dir-to-file").read_bytes() == b"now"
    assert (dest / "file-to-dir/x").read_bytes() == b"x"
    assert (dest / "same-layer").read_bytes() == b"s"
    assert (dest / "lib").is_dir() and not (dest / "lib").is_symlink()
    assert not any(p.name.startswith(".wh.") for p in dest.rglob("*"))
    _disk_matches_tree(dest, [base, upper])


def test_extract_takes_entry_pairs(dest: Path) -> None:
    layer = _layer([(Entry.file("a/b", 3), b"abc"), (Entry.symlink("a/c", "b"), None)])
    report = extract(read_layer(io.BytesIO(layer)), dest)
    assert (dest / "a/b").read_bytes() == b"abc" and os.readlink(dest / "a/c") == "b"
    assert report.entries == 2
