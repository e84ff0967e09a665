"""Fixture layouts judged by independent tools: skopeo reads them, umoci unpacks them (applying whiteouts and
hard links), and the unpacked trees, ELF files and planted markers are what the catalogue says."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from fixture_images import FixtureImages, fixture_image_fixture

from fixtures import IMAGES, BuildResult
from sconify.image.model import Platform

SINGLE_AMD64 = [n for n in IMAGES if n not in ("big", "shared-base", "multiarch", "arm64-only", "aarch64")]

fixture_image = fixture_image_fixture()


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def unpacked(fixture_image: FixtureImages, tmp_path_factory: pytest.TempPathFactory):
    """``unpacked(name)``: the root file system umoci unpacks from the fixture (once per module)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            result = fixture_image(name)
            bundle = tmp_path_factory.mktemp("umoci") / name
            run = _tool("umoci", "unpack", "--rootless", "--image", f"{result.layout}:{result.tag}", str(bundle))
            assert run.returncode == 0, run.stderr
            done[name] = bundle / "rootfs"
        return done[name]

    return get


def _layer_tars(result: BuildResult, platform: Platform | None = None) -> list[bytes]:
    """Every uncompressed layer tar, read through sconify's verifying reader."""
    out = []
    for layer in result.open(platform).layers:
        with layer.open_tar() as tar:
            out.append(tar.read())
    return out


def _tree_contains(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path.relative_to(root)))
    return hits


@pytest.mark.parametrize("name", [n for n in IMAGES if n not in ("big", "shared-base")])
def test_skopeo_inspects_every_fixture(name: str, fixture_image: FixtureImages) -> None:
    result = fixture_image(name)
    raw = _tool("skopeo", "inspect", "--raw", result.reference)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.encode() == (result.layout / "blobs" / "sha256" / result.digest.split(":")[1]).read_bytes()
    for manifest in result.manifests:
        arch = manifest.platform.architecture
        info = _tool("skopeo", "--override-arch", arch, "inspect", result.reference)
        assert info.returncode == 0, info.stderr
        data = json.loads(info.stdout)
        assert data["Digest"] == result.digest  # skopeo names an index by the index's digest
        assert (data["Architecture"], data["Os"]) == (arch, "linux")
        assert data["Layers"] == [d.digest for d in manifest.layers]


@pytest.mark.parametrize("name", SINGLE_AMD64)
def test_umoci_unpacks_every_amd64_fixture(name: str, unpacked) -> None:
    assert (unpacked(name) / "etc" / "passwd").is_file()


def test_busybox_sh_tree_after_umoci(unpacked) -> None:
    root = unpacked("busybox-sh")
    assert os.readlink(root / "bin" / "sh") == "busybox"
    assert (root / "bin" / "busybox").read_bytes() == Path("/usr/bin/busybox").read_bytes()
    assert not (root / "app" / "notes" / "draft.txt").exists()  # whiteout applied
    assert sorted(p.name for p in (root / "app" / "cache").iterdir()) == ["fresh.txt"]  # opaque dir applied
    link, target = root / "app" / "conf" / "override.conf.hardlink", root / "app" / "conf" / "override.conf"
    assert os.stat(link).st_ino == os.stat(target).st_ino
    assert os.readlink(root / "usr" / "local" / "bin" / "run") == "/app/run.sh"
    assert os.stat(root / "app" / "run.sh").st_mode & 0o777 == 0o755


def test_dynamic_c_tree_and_elf(unpacked) -> None:
    root = unpacked("dynamic-c")
    with open(root / "app" / "hello", "rb") as f:
        elf = ELFFile(f)
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_type"] == "ET_DYN"  # PIE
        interp = next(seg for seg in elf.iter_segments() if seg["p_type"] == "PT_INTERP").get_interp_name()
        needed = [t.needed for s in elf.iter_sections() if isinstance(s, DynamicSection)
                  for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    assert interp == "/lib64/ld-linux-x86-64.so.2"
    assert (root / interp.lstrip("/")).is_file()
    assert needed == ["libc.so.6"]
    assert (root / "lib" / "x86_64-linux-gnu" / "libc.so.6").is_file()
    home = root / "home" / "app"
    assert home.is_dir() and (home / ".profile").is_file()


def test_missing_lib_really_misses_its_library(unpacked) -> None:
    root = unpacked("missing-lib")
    with open(root / "app" / "needs-lib", "rb") as f:
        needed = [t.needed for s in ELFFile(f).iter_sections() if isinstance(s, DynamicSection)
                  for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    assert "libsconify_missing.so.1" in needed and "libc.so.6" in needed
    names = {name for _, _, files in os.walk(root) for name in files}
    assert "libsconify_missing.so.1" not in names and "libc.so.6" in names


def test_python_app_tree(unpacked) -> None:
    root = unpacked("python-app")
    stdlib = root / "usr" / "lib" / "python3.11"
    assert (stdlib / "os.py").is_file() and (stdlib / "json" / "__init__.py").is_file()
    for dropped in ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "pydoc_data", "turtledemo"):
        assert not (stdlib / dropped).exists()
    assert not list(stdlib.glob("config-*")) and not list(stdlib.rglob("__pycache__"))
    assert os.readlink(root / "usr" / "bin" / "python3") == "python3.11"
    assert os.readlink(root / "usr" / "bin" / "env") == "/bin/busybox"
    assert (root / "usr" / "local" / "bin" / "app").read_text().startswith("#!/usr/bin/env python3\n")
    assert not (root / "app" / "lib" / "legacy_helper.py").exists()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 30 * 1024 * 1024


def test_env_shebang_line(fixture_image: FixtureImages, tmp_path: Path) -> None:
    tars = _layer_tars(fixture_image("env-shebang"))
    assert b"#!/usr/bin/env python3 -u\n" in tars[2]


def test_aarch64_entry_is_an_aarch64_elf(fixture_image: FixtureImages, tmp_path: Path) -> None:
    result = fixture_image("aarch64")
    image = result.open(Platform("linux", "arm64"))
    from sconify.image.tarfs import read_layer

    with image.layers[0].open_tar() as tar:
        data = next(content.read() for entry, content in read_layer(tar) if entry.path == "app/hello")
    (tmp_path / "hello").write_bytes(data)
    with open(tmp_path / "hello", "rb") as f:
        elf = ELFFile(f)
        assert (elf.elfclass, elf.little_endian, elf["e_machine"], elf["e_type"]) == (64, True, "EM_AARCH64", "ET_EXEC")
        (load,) = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
        assert load["p_vaddr"] <= elf["e_entry"] < load["p_vaddr"] + load["p_filesz"]
        assert load["p_filesz"] == len(data)
    readelf = _tool("readelf", "-h", str(tmp_path / "hello"))
    assert "AArch64" in readelf.stdout
    binary = next(m for m in result.markers if m.purpose == "binary")
    assert binary.value.encode() in data


@pytest.mark.parametrize("name", [n for n in IMAGES if n not in ("big", "shared-base")])
def test_markers_are_unique_and_where_the_result_says(name: str, fixture_image: FixtureImages) -> None:
    result = fixture_image(name)
    values = [m.value for m in result.markers]
    assert len(set(values)) == len(values) and len(values) >= 4
    assert all(v.startswith(f"SCONIFY-MARKER-{m.image}-{m.purpose}-") for v, m in zip(values, result.markers,
                                                                                       strict=True))
    purposes = {m.purpose for m in result.markers}
    assert {"conf", "python", "hidden"} <= purposes
    assert any(m.in_config for m in result.markers)
    images = [result.open(m.platform) for m in result.manifests]
    tars = [_layer_tars(result, m.platform) for m in result.manifests]
    for marker in result.markers:
        needle = marker.value.encode()
        configs = [i for i, image in enumerate(images) if needle in image.config_bytes]
        layers = [(i, k) for i, layer_tars in enumerate(tars) for k, tar in enumerate(layer_tars) if needle in tar]
        assert not any(needle in image.manifest_bytes for image in images)
        if marker.in_config:
            assert len(configs) == 1 and layers == [], marker
            variable = marker.location.split(":")[2]
            assert f"{variable}={marker.value}" in images[configs[0]].config["config"]["Env"]
        else:
            assert configs == [] and len(layers) == 1, marker
            assert layers[0][1] == marker.layer, marker
            history = images[layers[0][0]].config["history"]
            assert len(history) == len(tars[layers[0][0]])


@pytest.mark.parametrize("name", ["busybox-sh", "dynamic-c", "python-app", "wrapper-exec", "distroless"])
def test_visible_markers_are_in_the_tree_and_hidden_ones_are_not(name: str, fixture_image: FixtureImages,
                                                                  unpacked) -> None:
    root = unpacked(name)
    result = fixture_image(name)
    hidden = [m for m in result.markers if not m.visible]
    assert hidden, "every fixture hides at least one marker behind a whiteout"
    for marker in result.markers:
        if marker.in_config:
            continue
        hits = _tree_contains(root, marker.value.encode())
        if marker.visible:
            assert hits == [marker.location.lstrip("/")], marker
        else:
            assert hits == [], marker
