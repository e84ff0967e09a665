"""merge: OCI whiteouts, opaque directories, replacement, implicit parents and hard links; umoci as a judge."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import BinaryIO

import pytest

from sconify.errors import IntegrityError, NotFoundError
from sconify.image import mediatypes as mt
from sconify.image.model import Descriptor, Image
from sconify.image.tarfs import Entry, EntryKind, LayerWriter, decode_name
from sconify.image.tree import FileTree, image_tree, merge


def _paths(tree: FileTree) -> list[str]:
    return list(tree)


def test_whiteout_deletes_a_path_and_everything_under_it() -> None:
    lower = [Entry.directory("a"), Entry.directory("a/b"), Entry.file("a/b/c", 0), Entry.file("a/d", 0),
             Entry.file("keep", 0)]
    tree = merge([lower, [Entry.whiteout("a/b"), Entry.whiteout("missing/thing")]])
    assert _paths(tree) == ["", "a", "a/d", "keep"]
    tree = merge([lower, [Entry.whiteout("a")]])
    assert _paths(tree) == ["", "keep"]
    assert tree.get("a") is None and "a/b/c" not in tree


def test_opaque_hides_lower_contents_but_not_the_same_layer_in_any_order() -> None:
    lower = [Entry.directory("d", mode=0o700), Entry.file("d/old", 0), Entry.directory("d/sub"),
             Entry.file("d/sub/x", 0)]
    for upper in (
        [Entry.opaque("d"), Entry.file("d/new", 0), Entry.file("d/sub/y", 0)],
        [Entry.file("d/new", 0), Entry.file("d/sub/y", 0), Entry.opaque("d")],
    ):
        tree = merge([lower, upper])
        assert _paths(tree) == ["", "d", "d/new", "d/sub", "d/sub/y"]
        assert tree["d"].entry.mode == 0o700 and tree["d"].layer == 0  # the directory itself stays
        assert tree["d/sub"].implicit and tree["d/sub"].layer == 1  # d/sub of the lower layer is gone
    root_opaque = merge([lower, [Entry.opaque(""), Entry.file("only", 0)]])
    assert _paths(root_opaque) == ["", "only"]


def test_whiteout_acts_on_lower_layers_only() -> None:
    tree = merge([[Entry.file("x", 0)], [Entry.file("x", 1, mode=0o600), Entry.whiteout("x")]])
    assert tree["x"].layer == 1 and tree["x"].entry.mode == 0o600


def test_replacement_rules() -> None:
    lower = [
        Entry.directory("dir", mode=0o700), Entry.file("dir/child", 0),
        Entry.directory("both", mode=0o700), Entry.file("both/child", 0),
        Entry.file("file", 0), Entry.symlink("link", "/usr/lib"),
    ]
    upper = [
        Entry.file("dir", 3, mode=0o640),  # a non-directory over a directory removes its children
        Entry.directory("both", mode=0o755),  # a directory over a directory merges, with the new metadata
        Entry.directory("file"),
        Entry.file("file/inside", 0),
        Entry.file("link/libc.so", 0),  # below a lower symlink: a directory appears, as in overlayfs
    ]
    tree = merge([lower, upper])
    assert tree["dir"].entry.kind is EntryKind.REGULAR and "dir/child" not in tree
    assert tree["both"].entry.mode == 0o755 and tree["both"].layer == 1 and "both/child" in tree
    assert tree["both/child"].layer == 0
    assert tree["file"].entry.kind is EntryKind.DIRECTORY and tree.children("file") == ["inside"]
    assert tree["link"].implicit and tree["link"].entry.kind is EntryKind.DIRECTORY
    assert tree.children("link") == ["libc.so"]


def test_implicit_parents_and_the_root_entry() -> None:
    tree = merge([[Entry.file("usr/local/bin/tool", 0)], [Entry.directory("", mode=0o700, uid=5)]])
    assert _paths(tree) == ["", "usr", "usr/local", "usr/local/bin", "usr/local/bin/tool"]
    node = tree["usr/local"]
    assert node.implicit and node.entry.mode == 0o755 and node.layer == 0
    assert tree[""].entry.mode == 0o700 and tree[""].layer == 1 and not tree[""].implicit
    assert merge([])[""].implicit


def test_hard_links_point_at_the_data_they_share() -> None:
    layers = [
        [Entry.file("bin/busybox", 10)],
        [Entry.hardlink("bin/su", "bin/busybox"), Entry.hardlink("bin/login", "bin/su")],
        [Entry.file("bin/busybox", 20)],  # replacing the original later does not change the links' data
        [Entry.hardlink("dangling", "nowhere")],
    ]
    tree = merge(layers)
    assert tree["bin/su"].origin == ("bin/busybox", 0)
    assert tree["bin/login"].origin == ("bin/busybox", 0)
    assert tree.content_source("bin/su") == ("bin/busybox", 0)
    assert tree.content_source("bin/busybox") == ("bin/busybox", 2)
    assert tree["dangling"].origin is None


def test_children_walk_and_lookup() -> None:
    names = ["b", "B", "a-b", "a", decode_name(b"\xff"), "\u00e9"]
    tree = merge([[Entry.directory("d")] + [Entry.file(f"d/{n}", 0) for n in names] + [Entry.file("d/a/x", 0)]])
    assert tree.children("d") == ["B", "a", "a-b", "b", "\u00e9", decode_name(b"\xff")]  # by bytes
    assert [n.path for n in tree.walk("d")] == [
        "d", "d/B", "d/a", "d/a/x", "d/a-b", "d/b", "d/\u00e9", "d/" + decode_name(b"\xff")
    ]
    assert "/d/a/x" in tree and "./d//a" in tree and tree.get("/d/b") is tree["d/b"]
    assert len(tree) == 1 + 1 + len(names) + 1
    with pytest.raises(NotFoundError, match="/d/b is not a directory"):
        tree.children("d/b")
    with pytest.raises(NotFoundError, match="/nope does not exist"):
        list(tree.walk("nope"))


# -- a whole image ----------------------------------------------------------------------------------------


class _Blobs:
    """An in-memory blob store, the smallest BlobSource."""

    name = "memory"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return io.BytesIO(self.blobs[desc.digest])


def _layer_tar(items: list[tuple[Entry, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with LayerWriter(out) as writer:
        for entry, content in items:
            writer.add(entry, content)
    return out.getvalue()


def _image(layers: list[bytes], wrong_diff_id: bool = False) -> Image:
    blobs = _Blobs()
    descriptors, diff_ids = [], []
    for tar in layers:
        blob = gzip.compress(tar, mtime=0)
        descriptors.append({"mediaType": mt.OCI_LAYER_GZIP, "digest": blobs.put(blob), "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
    if wrong_diff_id:
        diff_ids[-1] = "sha256:" + "0" * 64
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": blobs.put(config), "size": len(config)},
        "layers": descriptors,
    }).encode()
    return Image(manifest, mt.OCI_MANIFEST, config, blobs, name="test/image:1")


def test_image_tree_reads_every_layer_verified() -> None:
    layers = [
        _layer_tar([(Entry.directory("bin"), None), (Entry.file("bin/busybox", 4, mode=0o755), b"\x7fELF"),
                    (Entry.symlink("bin/sh", "busybox"), None)]),
        _layer_tar([(Entry.whiteout("bin/sh"), None), (Entry.symlink("bin/sh", "/bin/busybox"), None)]),
    ]
    tree = image_tree(_image(layers))
    assert tree.layers == 2
    assert tree["bin/sh"].layer == 1 and tree.resolve("/bin/sh") == "bin/busybox"
    with pytest.raises(IntegrityError, match="uncompresses to DiffID"):  # checked at the end of the stream
        image_tree(_image(layers, wrong_diff_id=True))


# -- umoci as an independent judge of whiteout semantics -------------------------------------------------


def _oci_layout(root: Path, layers: list[bytes]) -> Path:
    layout = root / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return "sha256:" + digest

    diff_ids = ["sha256:" + hashlib.sha256(tar).hexdigest() for tar in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": mt.OCI_LAYER, "digest": put(tar), "size": len(tar)} for tar in layers],
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": mt.OCI_MANIFEST, "digest": put(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layout


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpacks owners only as root")
def test_umoci_unpacks_the_same_tree(tmp_path: Path) -> None:
    layers = [
        [
            (Entry.directory("etc"), None), (Entry.file("etc/passwd", 4), b"root"),
            (Entry.file("etc/shadow", 1, mode=0o600), b"s"),
            (Entry.directory("opt/app/lib", mode=0o700), None), (Entry.file("opt/app/lib/old.so", 1), b"o"),
            (Entry.file("opt/app/keep", 1), b"k"),
            (Entry.directory("var/cache"), None), (Entry.file("var/cache/a", 1), b"a"),
            (Entry.directory("dir-to-file"), None), (Entry.file("dir-to-file/child", 1), b"c"),
            (Entry.file("file-to-dir", 1), b"f"), (Entry.symlink("bin", "usr/bin"), None),
        ],
        [
            (Entry.whiteout("etc/shadow"), None),
            (Entry.opaque("opt/app/lib"), None), (Entry.file("opt/app/lib/new.so", 1), b"n"),
            (Entry.whiteout("var/cache"), None),
            (Entry.file("dir-to-file", 1), b"n"),
            (Entry.directory("file-to-dir", mode=0o711), None), (Entry.file("file-to-dir/x", 1), b"x"),
            (Entry.hardlink("etc/passwd-", "etc/passwd"), None),
            (Entry.symlink("bin", "/usr/sbin"), None),
        ],
        [
            (Entry.directory("var/cache"), None), (Entry.file("var/cache/b", 1), b"b"),
            (Entry.whiteout("opt/app/keep"), None),
        ],
    ]
    tars = [_layer_tar(layer) for layer in layers]
    layout = _oci_layout(tmp_path, tars)
    rootfs = tmp_path / "rootfs"
    subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:latest", str(rootfs)],
                   check=True, capture_output=True, timeout=120)
    tree = merge([[e for e, _ in layer] for layer in layers])
    on_disk = {p.relative_to(rootfs).as_posix(): p.lstat() for p in rootfs.rglob("*")}
    assert set(on_disk) == {node.path for node in tree.walk() if node.path}
    for node in tree.walk():
        if not node.path:
            continue
        st_ = on_disk[node.path]
        if node.entry.kind is EntryKind.SYMLINK:
            assert os.readlink(rootfs / node.path) == node.entry.linkname
        elif node.entry.kind is EntryKind.DIRECTORY:
            assert stat.S_ISDIR(st_.st_mode) and stat.S_IMODE(st_.st_mode) == node.entry.mode, node.path
        else:
            assert stat.S_ISREG(st_.st_mode), node.path
