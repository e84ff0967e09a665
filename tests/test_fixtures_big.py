"""The generated benchmark images: ``big`` holds exactly the bytes asked for, split as asked, streamed with
bounded memory; ``shared-base`` variants share their base layers; generated content is deterministic."""

from __future__ import annotations

import resource
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from fixture_images import ROOT, FixtureImages, fixture_image_fixture

from fixtures import build_image
from fixtures.big import GiB, MiB, parse_size
from fixtures.content import GeneratedContent
from sconify.image.tarfs import EntryKind, read_layer

fixture_image = fixture_image_fixture()

SIZE = 20 * MiB


def _files(result) -> list[tuple[int, str, int, bytes]]:
    """(layer, path, size, first 64 KiB) of every regular file, read through sconify's verifying reader."""
    out = []
    for i, layer in enumerate(result.open().layers):
        with layer.open_tar() as tar:
            for entry, content in read_layer(tar):
                if entry.kind is EntryKind.REGULAR:
                    out.append((i, entry.path, entry.size, content.read(64 * 1024) if content else b""))
    return out


def test_big_holds_exactly_the_requested_bytes(fixture_image: FixtureImages) -> None:
    result = fixture_image("big", size=SIZE, layers=3)
    assert len(result.manifests[0].layers) == 3
    files = _files(result)
    data = [f for f in files if f[1].startswith("app/data/")]
    other = [f for f in files if f[1].startswith("usr/lib/bench/")]
    assert sum(f[2] for f in data) == int(SIZE * 0.8)
    assert sum(f[2] for f in data + other) == SIZE
    assert {f[0] for f in data} == {1, 2} and {f[0] for f in other} == {1, 2}  # every data layer has a share
    sizes = [f[2] for f in data]
    assert min(sizes) < 64 * 1024 and max(sizes) >= MiB  # small and large files
    assert result.facts["data_bytes"] == SIZE


def test_big_mixes_incompressible_and_text_content(fixture_image: FixtureImages) -> None:
    files = _files(fixture_image("big", size=SIZE, layers=3))
    ratios = {}
    for _, path, size, head in files:
        if size >= 64 * 1024 and path.startswith(("app/data/", "usr/lib/bench/")):
            ratios.setdefault(path.rsplit(".", 1)[1], []).append(len(zlib.compress(head, 1)) / len(head))
    assert set(ratios) == {"bin", "txt", "dat"}
    assert min(ratios["bin"]) > 0.99
    assert max(ratios["txt"]) < 0.6
    assert all(0.5 < r < 0.9 for r in ratios["dat"])


def test_big_is_deterministic_and_takes_its_parameters(fixture_image: FixtureImages, tmp_path: Path) -> None:
    first = fixture_image("big", size=SIZE, layers=3)
    again = build_image("big", tmp_path / "again", size="20MiB", layers=3)
    assert again.digest == first.digest
    other_seed = build_image("big", tmp_path / "seed", size=SIZE, layers=3, seed="other")
    assert other_seed.digest != first.digest
    five = build_image("big", tmp_path / "five", size=4 * MiB, layers=5, encrypted_fraction=0.5)
    assert len(five.manifests[0].layers) == 5
    files = _files(five)
    assert sum(f[2] for f in files if f[1].startswith("app/data/")) == 2 * MiB
    assert sum(f[2] for f in files if f[1].startswith("usr/lib/bench/")) == 2 * MiB


def test_big_streams_with_bounded_memory(tmp_path: Path) -> None:
    size = 256 * MiB
    code = f"import sys; from fixtures import build_image; build_image('big', sys.argv[1], size={size}, layers=3)"
    # Linux carries a process's peak RSS across fork and exec, so the build runs as the child of a small
    # launcher (not of this large pytest process) and its own peak is read from wait4.
    launcher = (
        "import os, sys\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n"
        "_, status, usage = os.wait4(pid, 0)\n"
        "print(usage.ru_maxrss if os.waitstatus_to_exitcode(status) == 0 else -1)\n"
    )
    done = subprocess.run([sys.executable, "-S", "-c", launcher, sys.executable, "-c", code, str(tmp_path / "big")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    assert peak_kib > 0, done.stderr
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib} KiB while writing a {size >> 20} MiB image"
    blobs = sum(p.stat().st_size for p in (tmp_path / "big" / "blobs" / "sha256").iterdir())
    assert blobs > size // 3  # the data really went to disk (part of it is incompressible)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss > 0


def test_shared_base_variants_share_their_base_layers(fixture_image: FixtureImages, tmp_path: Path) -> None:
    results = [build_image("shared-base", tmp_path / f"v{v}", variant=v, base_size=MiB) for v in range(3)]
    layers = [r.manifests[0].layers for r in results]
    assert all(len(ls) == 3 for ls in layers)
    assert layers[0][0] == layers[1][0] == layers[2][0]
    assert layers[0][1] == layers[1][1] == layers[2][1]
    assert len({ls[2].digest for ls in layers}) == 3
    assert len({r.digest for r in results}) == 3
    markers = [set(r.marker_values()) for r in results]
    assert not markers[0] & markers[1] and not markers[1] & markers[2]
    assert results[0].manifests[0].layers[0] == fixture_image("busybox-sh").manifests[0].layers[0]


@pytest.mark.parametrize("style", ["random", "text", "mixed"])
def test_generated_content_is_exact_and_repeatable(style: str) -> None:
    size = 3 * MiB + 12345
    content = GeneratedContent(size, "seed-a", style)
    with content.open() as a, content.open() as b:
        first, second = a.read(), b.read()
    assert len(first) == size and first == second
    with GeneratedContent(size, "seed-b", style).open() as c:
        assert c.read() != first
    pieces = []
    with content.open() as d:  # odd read sizes give the same bytes
        while chunk := d.read(77777):
            pieces.append(chunk)
    assert b"".join(pieces) == first


def test_parse_size() -> None:
    assert parse_size("20M") == 20 * MiB
    assert parse_size("1.5GiB") == 3 * GiB // 2
    assert parse_size("1000kb") == 1000 * 1000
    assert parse_size(123) == 123
    assert parse_size("4096") == 4096
