"""Round trips over generated trees: protect, verify and decrypt give back exactly the tree that went in.

Trees hold empty files, files of exactly one chunk and one byte more, zero-filled and truly sparse
files, deep paths, non-UTF-8 names, symlinks and hard links, under random regions of every mode.
"""

from __future__ import annotations

import gc
import os
import random
import resource
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sconify.errors import ConversionError
from sconify.fspf import DirectoryVolume, RegionTable, VolumeKey, protect_directory

CHUNK = 4096
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5]
NAMES = [b"a", b"b", b"app", b"lib", b"caf\xc3\xa9", b"\xff\xfe", b"with space", b"x.py", b"deep", b".hidden"]
REGION_SETS = [
    ["encrypted:/"],
    ["encrypted:/a"],
    ["authenticated:/"],
    ["encrypted:/a", "authenticated:/a/b"],
    ["encrypted:/", "not-protected:/b", "authenticated:/b/a"],
    ["authenticated:/app", "encrypted:/app/deep", "not-protected:/app/deep/b"],
]

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=7)
# contents come from a drawn seed (random bytes) or are zero-filled; drawing the bytes themselves would
# spend hypothesis' entropy budget on data that shrinking cannot make more readable
contents = st.tuples(st.sampled_from(SIZES), st.integers(0, 2**32), st.booleans()).map(
    lambda t: random.Random(t[1]).randbytes(t[0]) if t[2] else bytes(t[0])
)


@st.composite
def trees(draw: st.DrawFn) -> dict[str, object]:
    files = draw(st.dictionaries(paths.map(tuple), contents, min_size=1, max_size=12))
    # a path cannot be both a file and a directory
    names = sorted(files, key=len)
    kept: dict[tuple[bytes, ...], bytes] = {}
    for name in names:
        if not any(name[: len(k)] == k for k in kept):
            kept[name] = files[name]
    symlinks = draw(
        st.lists(
            st.tuples(st.sampled_from(NAMES), st.sampled_from([b"a", b"/etc/passwd", b"../x", b"\xff"])), max_size=3
        )
    )
    hard = draw(st.lists(st.integers(0, 100), max_size=3))
    regions = draw(st.sampled_from(REGION_SETS))
    modes = draw(st.lists(st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o640]), min_size=1, max_size=4))
    return {"files": kept, "symlinks": symlinks, "hard": hard, "regions": regions, "modes": modes}


def build(root: Path, tree: dict[str, object]) -> None:
    base = os.fsencode(root)
    files: dict[tuple[bytes, ...], bytes] = tree["files"]  # type: ignore[assignment]
    modes: list[int] = tree["modes"]  # type: ignore[assignment]
    for i, (parts, data) in enumerate(sorted(files.items())):
        path = base + b"/" + b"/".join(parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, modes[i % len(modes)])
        os.utime(path, ns=(1_600_000_000_123_456_789 + i, 1_600_000_000_123_456_789 + i))
    ordered = sorted(files)
    for i, (name, target) in enumerate(tree["symlinks"]):  # type: ignore[attr-defined]
        directory = os.path.dirname(base + b"/" + b"/".join(ordered[i % len(ordered)]))
        link = directory + b"/link-" + name
        if not os.path.lexists(link):
            os.symlink(target, link)
    regions = RegionTable.of(tree["regions"])  # type: ignore[arg-type]
    for n in tree["hard"]:  # type: ignore[attr-defined]
        name = b"/" + b"/".join(ordered[n % len(ordered)])
        # a hard link must stay in a region of its file's mode (refusal tested separately); a region
        # prefix can name a file ("/app"), and then "/app.hard" is outside it
        if regions.mode_for(name) != regions.mode_for(name + b".hard"):
            continue
        source = base + name
        link = source + b".hard"
        if not os.path.lexists(link):
            os.link(source, link)


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Everything the round trip must keep, by path: type, permissions, mtime, content or target,
    and which paths share an inode."""
    base = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    inodes: dict[int, bytes] = {}
    for directory, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st_ = os.lstat(path)
            rel = path[len(base) :]
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path), st_.st_mtime_ns)
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                first = inodes.setdefault(st_.st_ino, rel)
                with open(path, "rb") as handle:
                    out[rel] = ("file", handle.read(), stat.S_IMODE(st_.st_mode), st_.st_mtime_ns, first)
    return out


def canonical_links(snap: dict[bytes, tuple]) -> dict[bytes, tuple]:
    """Hard-link groups named by their smallest member, so two snapshots compare equal."""
    groups: dict[bytes, list[bytes]] = {}
    for path, value in snap.items():
        if value[0] == "file":
            groups.setdefault(value[4], []).append(path)
    smallest = {member: min(members) for members in groups.values() for member in members}
    return {p: (v[:4] + (smallest[p],) if v[0] == "file" else v) for p, v in snap.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(), workers=st.sampled_from([1, 2]), data=st.data())
def test_protect_verify_decrypt_gives_back_the_tree(tree: dict[str, object], workers: int, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out, plain = Path(tmp, "src"), Path(tmp, "out"), Path(tmp, "plain")
        src.mkdir()
        build(src, tree)
        regions = RegionTable.of(tree["regions"])  # type: ignore[arg-type]
        key = VolumeKey(bytes(32))
        result = protect_directory(src, out, regions, key, chunk_size=CHUNK, workers=workers)
        with DirectoryVolume(out, key, result.tag) as volume:
            report = volume.verify(workers=workers)
            assert report.ok, report.failure()
            # any byte range of any protected file reads back as the source has it
            records = [r for r in volume.volume.records if r.kind.label in ("file", "hardlink")]
            if records:
                record = data.draw(st.sampled_from(records))
                source = os.fsencode(src) + record.path
                with open(source, "rb") as handle:
                    expected = handle.read()
                offset = data.draw(st.integers(0, len(expected) + 10))
                length = data.draw(st.integers(0, 3 * CHUNK))
                assert volume.read_range(record.path, offset, length) == expected[offset : offset + length]
                assert volume.read_file(record.path) == expected
            volume.decrypt_to(plain, workers=workers)
        assert canonical_links(snapshot(plain)) == canonical_links(snapshot(src))


def test_large_zero_and_sparse_files_round_trip_and_are_not_stored_as_zeros(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "zeros").write_bytes(bytes(300 * CHUNK + 7))
    with open(src / "sparse", "wb") as handle:  # a hole of 8 MiB, then one byte
        handle.truncate(8 * 1024 * 1024)
        handle.seek(0, os.SEEK_END)
        handle.write(b"!")
    key = VolumeKey.generate()
    result = protect_directory(src, tmp_path / "out", RegionTable.of(["encrypted:/"]), key, chunk_size=CHUNK, workers=2)
    stored = (tmp_path / "out" / "zeros").read_bytes()
    assert len(stored) == 300 * CHUNK + 7
    assert bytes(CHUNK) not in stored
    with DirectoryVolume(tmp_path / "out", key, result.tag) as volume:
        assert volume.verify(workers=2).ok
        assert volume.read_file("/zeros") == bytes(300 * CHUNK + 7)
        assert volume.read_range("/sparse", 8 * 1024 * 1024 - 2, 10) == b"\0\0!"
        with volume.open("/sparse") as handle:
            handle.seek(-1, os.SEEK_END)
            assert handle.read() == b"!"
            handle.seek(CHUNK - 3)
            assert handle.read(6) == bytes(6)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hard_link_across_protection_modes_is_refused_and_leaves_nothing_behind(tmp_path: Path, workers: int) -> None:
    src = tmp_path / "src"
    (src / "app").mkdir(parents=True)
    (src / "zzz").mkdir()
    for i in range(20):  # sealing of these is under way when the walk meets the link
        (src / "app" / f"f{i:02d}").write_bytes(os.urandom(5 * CHUNK))
    os.link(src / "app" / "f00", src / "zzz" / "alias")
    gc.collect()  # files left to the collector by earlier tests must not close during the count
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConversionError, match="different protection"):
        protect_directory(
            src,
            tmp_path / "out",
            RegionTable.of(["encrypted:/app"]),
            VolumeKey.generate(),
            chunk_size=CHUNK,
            workers=workers,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1])
def test_chunk_boundaries_have_the_expected_number_of_chunks(tmp_path: Path, size: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(size))
    key = VolumeKey.generate()
    result = protect_directory(src, tmp_path / "out", RegionTable.of(["encrypted:/"]), key, chunk_size=CHUNK)
    with DirectoryVolume(tmp_path / "out", key, result.tag) as volume:
        record = volume.volume.record("/f")
        assert record.size == size
        assert len(record.chunks) == 28 * -(-size // CHUNK)
        assert volume.read_file("/f") == (src / "f").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_many_files_need_few_open_descriptors(tmp_path: Path, workers: int) -> None:
    """Descriptors are held per segment being worked on, not per file: 600 files under a limit of 64."""
    src = tmp_path / "src"
    (src / "app").mkdir(parents=True)
    for i in range(600):
        (src / "app" / f"f{i:03d}").write_bytes(b"x" * (i % 7))
    key = VolumeKey.generate()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        result = protect_directory(src, tmp_path / "out", RegionTable.of(["encrypted:/app"]), key, workers=workers)
        with DirectoryVolume(tmp_path / "out", key, result.tag) as volume:
            assert volume.verify(workers=workers).ok
            volume.decrypt_to(tmp_path / "plain", workers=workers)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (tmp_path / "plain" / "app" / "f599").read_bytes() == b"x" * (599 % 7)
