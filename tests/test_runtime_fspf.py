"""The launcher's C reader of the FSPF agrees with sconify's Python reader (sconify.fspf).

A tree with every kind of entry (files around chunk boundaries, empty and sparse files, deep and
non-UTF-8 names, symlinks, hard links, a FIFO, a device, nested regions of each mode) is protected with
the Python writer; the launcher must start and leave exactly the original tree readable. Then each kind
of tampering is applied to a fresh copy: the Python reader reports a problem of some kind for one path,
and the launcher must refuse naming the same path and the same kind.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from test_runtime_support import (  # noqa: F401 (runtime_binary is a fixture)
    EXIT_PROTECTION,
    ProtectedRoot,
    make_source_tree,
    protect_tree,
    require_chroot,
    run_chroot,
    runtime_binary,
    service,
    stderr_line,
    write_session,
)

from sconify.fspf import DirectoryVolume, verify_directory
from sconify.fspf.format import encode_body

CHUNK = 4096
REGIONS = (
    "authenticated:/",
    "encrypted:/app",
    "authenticated:/app/public",
    "not-protected:/app/public/cache",
    "encrypted:/srv/keys",
    "not-protected:/proc",
    "not-protected:/dev",
    "not-protected:/tmp",
    "not-protected:/run",
)
SIZES = {"empty": 0, "one": 1, "chunk-1": CHUNK - 1, "chunk": CHUNK, "chunk+1": CHUNK + 1, "three": 3 * CHUNK + 7}
MTIME = 1_500_000_000_987_654_321
REFUSAL = re.compile(r"protection check failed: (?P<path>\S+) .*\((?P<kind>[a-z-]+)\); the image")


def content(name: str, size: int) -> bytes:
    seed = sum(name.encode())
    return bytes((seed + 7 * i) % 256 for i in range(size))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, runtime_binary: Path) -> Path:  # noqa: F811
    require_chroot()
    files: dict[str, tuple[bytes, int, int, int]] = {}
    for name, size in SIZES.items():
        files[f"/app/{name}.bin"] = (content(name, size), 0o640, 1000, 1001)
        files[f"/app/public/{name}.txt"] = (content(name + "p", size), 0o644, 0, 0)
    files["/app/deep/er/and/deeper/file.py"] = (b"print('deep')\n", 0o600, 1000, 1001)
    files["/app/public/cache/scratch"] = (b"not protected\n", 0o666, 0, 0)
    files["/srv/keys/server.key"] = (b"-----BEGIN KEY-----\n" * 300, 0o400, 1000, 1001)
    files["/app/setuid-tool"] = (content("setuid", 5000), 0o4755, 0, 0)
    src = make_source_tree(tmp_path_factory.mktemp("runtime-fspf"), runtime_binary, files)
    app = os.fsencode(src / "app")
    with open(app + b"/caf\xc3\xa9-\xff.bin", "wb") as f:
        f.write(content("odd name", 2 * CHUNK))
    os.chown(app + b"/caf\xc3\xa9-\xff.bin", 1000, 1001)
    with open(src / "app/sparse.bin", "wb") as f:
        f.truncate(5 * CHUNK + 3)
    os.link(src / "app/three.bin", src / "app/three-link.bin")
    (src / "app/link-to-one").symlink_to("one.bin")
    (src / "app/dangling").symlink_to("/nowhere/at/all")
    os.mkfifo(src / "app/queue", 0o620)
    os.mknod(src / "app/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkdir(src / "app/empty-dir", 0o710)
    for path in sorted(src.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        os.utime(path, ns=(MTIME, MTIME), follow_symlinks=False)
    return src


def protected(source: Path, tmp_path: Path, runtime: Path) -> ProtectedRoot:
    pr = protect_tree(source, tmp_path / "root", runtime, REGIONS, chunk_size=CHUNK)
    write_session(pr, [service(pr, command="/bin/true", pwd="/")])
    return pr


def snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Every path below /app and /srv with its type, content or target, owner, mode and mtime."""
    out: dict[bytes, tuple[object, ...]] = {}
    for top in (b"app", b"srv"):
        for dirpath, dirnames, filenames in os.walk(os.fsencode(root) + b"/" + top):
            for name in dirnames + filenames:
                path = dirpath + b"/" + name
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        body: object = f.read()
                elif stat.S_ISLNK(st.st_mode):
                    body = os.readlink(path)
                else:
                    body = st.st_rdev
                rel = path[len(os.fsencode(root)):]
                out[rel] = (stat.S_IFMT(st.st_mode), body, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode),
                            st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None)
    return out


def test_the_launcher_leaves_exactly_the_original_tree(source: Path, tmp_path: Path, runtime_binary: Path,  # noqa: F811
                                                       ) -> None:
    pr = protected(source, tmp_path, runtime_binary)
    assert (pr.root / "app/chunk.bin").read_bytes() != (source / "app/chunk.bin").read_bytes()

    done = run_chroot(pr.root, pr.env)

    assert done.returncode == 0, done.stderr
    assert snapshot(pr.root) == snapshot(source)
    link, target = os.stat(pr.root / "app/three-link.bin"), os.stat(pr.root / "app/three.bin")
    assert link.st_ino == target.st_ino
    again = run_chroot(pr.root, pr.env)  # a restart verifies the plaintext the first start left
    assert again.returncode == 0, again.stderr
    assert snapshot(pr.root) == snapshot(source)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def swap_chunks(root: Path) -> None:
    path = root / "app/three.bin"
    data = path.read_bytes()
    path.write_bytes(data[CHUNK:2 * CHUNK] + data[:CHUNK] + data[2 * CHUNK:])


def chunk_from_another_file(root: Path) -> None:
    (root / "app/chunk.bin").write_bytes((root / "app/three.bin").read_bytes()[:CHUNK])


def retarget_symlink(root: Path) -> None:
    (root / "app/link-to-one").unlink()
    (root / "app/link-to-one").symlink_to("three.bin")


def file_to_directory(root: Path) -> None:
    (root / "app/one.bin").unlink()
    (root / "app/one.bin").mkdir()


def fifo_to_file(root: Path) -> None:
    (root / "app/queue").unlink()
    (root / "app/queue").write_bytes(b"")


def another_device(root: Path) -> None:
    (root / "app/null").unlink()
    os.mknod(root / "app/null", 0o666 | stat.S_IFCHR, os.makedev(1, 5))


def directory_to_symlink(root: Path) -> None:
    (root / "app/empty-dir").rmdir()
    (root / "app/empty-dir").symlink_to("/tmp")


def hard_link_made_a_different_copy(root: Path) -> None:
    link = root / "app/three-link.bin"
    link.unlink()
    link.write_bytes((root / "app/chunk.bin").read_bytes()[:10] + (root / "app/three.bin").read_bytes()[10:])


def almost_the_plaintext(root: Path) -> None:
    (root / "app/chunk.bin").write_bytes(content("chunk", CHUNK)[:-1] + b"!")


# case -> (a path the Python reader must report, the change)
TAMPERING: dict[str, tuple[str, Callable[[Path], object]]] = {
    "flip in the last chunk": ("/app/three.bin", lambda r: flip(r / "app/three.bin", 3 * CHUNK + 2)),
    "flip an authenticated byte": ("/app/public/chunk.txt", lambda r: flip(r / "app/public/chunk.txt", 100)),
    "swap two chunks": ("/app/three.bin", swap_chunks),
    "chunk from another file": ("/app/chunk.bin", chunk_from_another_file),
    "truncate": ("/app/chunk+1.bin", lambda r: os.truncate(r / "app/chunk+1.bin", CHUNK)),
    "extend": ("/app/one.bin", lambda r: os.truncate(r / "app/one.bin", 2)),
    "extend an empty file": ("/app/empty.bin", lambda r: (r / "app/empty.bin").write_bytes(b"x")),
    "remove": ("/srv/keys/server.key", lambda r: (r / "srv/keys/server.key").unlink()),
    "add": ("/app/public/new.txt", lambda r: (r / "app/public/new.txt").write_bytes(b"new")),
    "rename": ("/app/chunk-1.bin", lambda r: (r / "app/chunk-1.bin").rename(r / "app/renamed.bin")),
    "retarget a symlink": ("/app/link-to-one", retarget_symlink),
    "file to directory": ("/app/one.bin", file_to_directory),
    "fifo to file": ("/app/queue", fifo_to_file),
    "another device": ("/app/null", another_device),
    "directory to symlink": ("/app/empty-dir", directory_to_symlink),
    "hard link made a different copy": ("/app/three-link.bin", hard_link_made_a_different_copy),
    "almost the plaintext in an encrypted region": ("/app/chunk.bin", almost_the_plaintext),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_each_tampering_is_refused_as_the_python_reader_reports_it(source: Path, tmp_path: Path,
                                                                   runtime_binary: Path, case: str) -> None:  # noqa: F811
    path, tamper = TAMPERING[case]
    pr = protected(source, tmp_path, runtime_binary)
    tamper(pr.root)

    report = verify_directory(pr.root, pr.key, bytes.fromhex(pr.tag), metadata_path="/.sconify/fspf/volume.fspf")
    problems = {p.path.decode("utf-8", "replace"): p.kind.value for p in report.problems}
    assert path in problems, problems
    done = run_chroot(pr.root, pr.env)

    assert done.returncode == EXIT_PROTECTION
    # The launcher stops at the first problem of its walk: one the Python reader reports, of the same kind.
    refused = REFUSAL.search(stderr_line(done))
    assert refused is not None, done.stderr
    assert problems.get(refused["path"]) == refused["kind"], (refused.groups(), problems)
    assert done.stdout == b""


def drop_record(pr: ProtectedRoot, path: bytes) -> None:
    """Seal the metadata again without the record of ``path``, as for a layer that left that directory implicit."""
    metadata = pr.root / ".sconify/fspf/volume.fspf"
    with DirectoryVolume(pr.root, pr.key, bytes.fromhex(pr.tag), metadata_path="/.sconify/fspf/volume.fspf") as volume:
        header, regions = volume.volume.header, volume.volume.regions
        records = [r for r in volume.volume.records if r.path != path]
    assert len(records) == len(volume.volume.records) - 1
    body = encode_body(regions, records, header.chunk_size)
    sealed, tag = pr.key.seal_metadata(replace(header, body_length=len(body)), body)
    metadata.write_bytes(sealed)
    pr.tag = tag.hex()
    write_session(pr, [service(pr, command="/bin/true", pwd="/")])


def test_an_implicit_parent_directory_is_accepted(source: Path, tmp_path: Path, runtime_binary: Path,  # noqa: F811
                                                  ) -> None:
    pr = protected(source, tmp_path, runtime_binary)
    drop_record(pr, b"/app/deep/er")  # /app/deep/er/and/deeper/file.py is still recorded

    assert verify_directory(pr.root, pr.key, bytes.fromhex(pr.tag), metadata_path="/.sconify/fspf/volume.fspf").ok
    done = run_chroot(pr.root, pr.env)
    assert done.returncode == 0, done.stderr


def test_an_unrecorded_directory_with_nothing_recorded_below_is_refused(source: Path, tmp_path: Path,
                                                                         runtime_binary: Path) -> None:  # noqa: F811
    pr = protected(source, tmp_path, runtime_binary)
    drop_record(pr, b"/app/empty-dir")

    report = verify_directory(pr.root, pr.key, bytes.fromhex(pr.tag), metadata_path="/.sconify/fspf/volume.fspf")
    assert [(p.path, p.kind.value) for p in report.problems] == [(b"/app/empty-dir", "unexpected")]
    done = run_chroot(pr.root, pr.env)
    assert done.returncode == EXIT_PROTECTION
    assert "/app/empty-dir" in stderr_line(done) and "(unexpected)" in done.stderr.decode()
