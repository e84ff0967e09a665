"""The fixture builder: every catalogue image builds, twice to the same digest (also from the command line),
with the configs the catalogue promises, sorted deterministic layers, and clear errors for bad requests."""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from fixture_images import ROOT, FixtureImages, fixture_image_fixture

from fixtures import IMAGES, build_image
from fixtures.spec import SOURCE_DATE_EPOCH
from sconify.errors import UsageError
from sconify.image import mediatypes as mt
from sconify.image.model import Platform
from sconify.image.streams import detect_compression
from sconify.image.tarfs import EntryKind, path_sort_key, read_layer

SMALL = [name for name in IMAGES if name not in ("big", "shared-base")]
BUILD = ROOT / "fixtures" / "build"

fixture_image = fixture_image_fixture()


def _entries(result, platform: Platform | None = None) -> list[list]:
    """Every layer's entries (without content) read back through sconify's verifying reader."""
    image = result.open(platform)
    out = []
    for layer in image.layers:
        with layer.open_tar() as tar:
            out.append([entry for entry, _ in read_layer(tar)])
    return out


def test_the_catalogue_has_every_image_the_brief_lists() -> None:
    wanted = {
        "busybox-sh", "dynamic-c", "python-app", "distroless", "entry-two-symlinks", "env-shebang",
        "multi-entry-cmd", "shell-form", "missing-lib", "aarch64", "symlink-loop", "no-command", "wrapper-exec",
        "setuid", "secret-env", "multiarch", "arm64-only", "big", "shared-base",
    }
    assert wanted <= set(IMAGES)
    assert all(IMAGES[name].strip() for name in IMAGES)


@pytest.mark.parametrize("name", SMALL)
def test_image_builds_twice_to_the_same_digest(name: str, fixture_image: FixtureImages, tmp_path: Path) -> None:
    first = fixture_image(name)
    # The second build runs in another process (another hash seed, other temp dirs, gcc run again).
    done = subprocess.run([str(BUILD), "--json", name, f"{tmp_path / 'again'}:v2"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert again["digest"] == first.digest, _difference(first.reference, again["reference"])
    assert again["reference"] == f"oci:{tmp_path / 'again'}:v2"
    assert [m["value"] for m in again["markers"]] == list(first.marker_values())
    index = json.loads((tmp_path / "again" / "index.json").read_text())
    assert [d["digest"] for d in index["manifests"]] == [first.digest]


@pytest.mark.parametrize("name", SMALL)
def test_layers_are_sorted_with_fixed_times(name: str, fixture_image: FixtureImages) -> None:
    result = fixture_image(name)
    platform = result.manifests[0].platform
    for layer in _entries(result, platform):
        paths = [entry.path for entry in layer]
        assert paths == sorted(paths, key=path_sort_key)
        assert len(set(paths)) == len(paths)
        assert {entry.mtime for entry in layer} == {Decimal(SOURCE_DATE_EPOCH)}
        for entry in layer:  # every parent directory precedes its children in the same layer
            if "/" in entry.path:
                assert entry.path.rsplit("/", 1)[0] in paths[: paths.index(entry.path)]


def test_busybox_sh_layers_hold_whiteout_opaque_dir_hard_link_and_symlinks(fixture_image: FixtureImages) -> None:
    result = fixture_image("busybox-sh")
    base, app, upper = _entries(result)
    by_path = {entry.path: entry for entry in base}
    assert by_path["bin/busybox"].kind is EntryKind.REGULAR and by_path["bin/busybox"].mode == 0o755
    assert by_path["bin/sh"].kind is EntryKind.SYMLINK and by_path["bin/sh"].linkname == "busybox"
    assert by_path["bin/busybox"].size == Path("/usr/bin/busybox").stat().st_size
    assert {"app/notes/draft.txt", "app/cache/stale-1.txt", "app/run.sh"} <= {e.path for e in app}
    top = {entry.path: entry for entry in upper}
    assert top["app/notes/.wh.draft.txt"].whiteout_target == "app/notes/draft.txt"
    assert top["app/cache/.wh..wh..opq"].is_opaque
    link = top["app/conf/override.conf.hardlink"]
    assert link.kind is EntryKind.HARDLINK and link.linkname == "app/conf/override.conf"
    assert top["usr/local/bin/run"].kind is EntryKind.SYMLINK and top["usr/local/bin/run"].linkname == "/app/run.sh"


@pytest.mark.parametrize(
    ("name", "entrypoint", "cmd"),
    [
        ("busybox-sh", ["/app/run.sh"], ["hello"]),
        ("multi-entry-cmd", ["/bin/sh", "-c", 'exec "$0" "$@"'], ["/app/run.sh", "a", "b"]),
        ("shell-form", None, ["/bin/sh", "-c", "echo $HOME && /app/run.sh"]),
        ("no-command", None, None),
        ("wrapper-exec", ["/docker-entrypoint.sh"], ["/app/server", "--port", "80"]),
        ("entry-two-symlinks", ["/usr/bin/app"], ["serve"]),
        ("symlink-loop", ["/a"], None),
    ],
)
def test_commands_are_stored_exactly(name: str, entrypoint, cmd, fixture_image: FixtureImages) -> None:
    config = fixture_image(name).open().config["config"]
    assert config.get("Entrypoint") == entrypoint
    assert config.get("Cmd") == cmd


def test_users_workdirs_and_platforms(fixture_image: FixtureImages) -> None:
    assert fixture_image("busybox-sh").open().config["config"]["User"] == "root"
    dynamic = fixture_image("dynamic-c").open().config["config"]
    assert (dynamic["User"], dynamic["WorkingDir"]) == ("1000:1000", "/home/app")
    assert fixture_image("distroless").open().config["config"]["User"] == "65532"
    python = fixture_image("python-app").open().config["config"]
    assert python["WorkingDir"] == "/app"
    assert any(item.startswith("PATH=") and "/usr/bin" in item for item in python["Env"])
    arm = fixture_image("aarch64").open(Platform("linux", "arm64"))
    assert (arm.config["architecture"], arm.config["os"]) == ("arm64", "linux")
    assert fixture_image("busybox-sh").open().config["architecture"] == "amd64"


def test_secret_env_image_carries_secrets_as_markers(fixture_image: FixtureImages) -> None:
    result = fixture_image("secret-env")
    env = dict(item.split("=", 1) for item in result.open().config["config"]["Env"])
    for name in ("API_TOKEN", "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        marker = next(m for m in result.markers if m.location == f"config:Env:{name}")
        assert env[name] == marker.value
        assert marker.layer is None and marker.in_config
    assert env["APP_MODE"] == "production"


def test_setuid_and_setgid_modes(fixture_image: FixtureImages) -> None:
    app = {entry.path: entry for entry in _entries(fixture_image("setuid"))[1]}
    assert app["usr/bin/su-helper"].mode == 0o4755
    assert app["usr/bin/wall-helper"].mode == 0o2755


def test_distroless_has_no_shell(fixture_image: FixtureImages) -> None:
    paths = {entry.path for layer in _entries(fixture_image("distroless")) for entry in layer}
    assert "app/server" in paths
    assert not {"bin/sh", "bin/busybox", "usr/bin/env"} & paths
    home = next(e for e in _entries(fixture_image("distroless"))[0] if e.path == "home/nonroot")
    assert (home.uid, home.gid, home.mode) == (65532, 65532, 0o700)


def test_entry_two_symlinks_chain(fixture_image: FixtureImages) -> None:
    app = {entry.path: entry for entry in _entries(fixture_image("entry-two-symlinks"))[1]}
    assert app["usr/bin/app"].linkname == "/opt/app/current"
    assert app["opt/app/current"].linkname == "v1/bin/app"
    assert app["opt/app/v1/bin/app"].kind is EntryKind.REGULAR


def test_symlink_loop(fixture_image: FixtureImages) -> None:
    app = {entry.path: entry for entry in _entries(fixture_image("symlink-loop"))[1]}
    assert (app["a"].linkname, app["b"].linkname) == ("/b", "/a")


def test_indexes_list_their_platforms(fixture_image: FixtureImages) -> None:
    multi = fixture_image("multiarch")
    assert multi.is_index and multi.media_type == mt.OCI_INDEX
    assert [str(m.platform) for m in multi.manifests] == ["linux/amd64", "linux/arm64"]
    # The entries are the single-platform images of the catalogue, byte for byte.
    assert multi.manifests[0].digest == fixture_image("busybox-sh").digest
    assert multi.manifests[1].digest == fixture_image("aarch64").digest
    assert multi.open(Platform("linux", "arm64")).digest == fixture_image("aarch64").digest
    only = fixture_image("arm64-only")
    assert [str(m.platform) for m in only.manifests] == ["linux/arm64"]
    with pytest.raises(Exception, match="linux/amd64"):
        only.open(Platform("linux", "amd64"))


@pytest.mark.parametrize("compression", [mt.NONE, mt.ZSTD])
def test_other_compressions_keep_the_same_tars(compression: str, fixture_image: FixtureImages, tmp_path: Path) -> None:
    gzip = fixture_image("busybox-sh")
    other = build_image("busybox-sh", tmp_path / "layout", "c", compression=compression)
    assert other.digest != gzip.digest
    assert other.manifests[0].diff_ids == gzip.manifests[0].diff_ids
    image = other.open()
    for layer in image.layers:
        assert layer.descriptor.media_type == mt.layer_type("oci", compression)
        with layer.open_blob() as blob:
            assert detect_compression(blob.read(16)) == compression
        with layer.open_tar() as tar:  # verifies digest, size and DiffID
            tar.read()
    again = build_image("busybox-sh", tmp_path / "again", "c", compression=compression)
    assert again.digest == other.digest


def test_layouts_can_hold_several_fixtures(tmp_path: Path) -> None:
    first = build_image("shell-form", tmp_path / "shared", "one")
    second = build_image("no-command", tmp_path / "shared", "two")
    index = json.loads((tmp_path / "shared" / "index.json").read_text())
    tags = {d["annotations"]["org.opencontainers.image.ref.name"]: d["digest"] for d in index["manifests"]}
    assert tags == {"one": first.digest, "two": second.digest}
    assert first.open().digest == first.digest and second.open().digest == second.digest


def test_bad_requests_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no-such-image"):
        build_image("no-such-image", tmp_path / "x")
    with pytest.raises(UsageError, match="colour"):
        build_image("busybox-sh", tmp_path / "x", colour="red")
    with pytest.raises(UsageError, match="layers"):
        build_image("big", tmp_path / "x", size=1000, layers=2)
    with pytest.raises(UsageError, match="size"):
        build_image("big", tmp_path / "x", size="lots")
    with pytest.raises(UsageError, match="compression"):
        build_image("busybox-sh", tmp_path / "x", compression="bzip2")
    assert not (tmp_path / "x").exists()


def test_command_line_lists_images_and_reports_errors(tmp_path: Path) -> None:
    listing = subprocess.run([str(BUILD), "--list"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == list(IMAGES)
    assert "size=" in next(line for line in listing.stdout.splitlines() if line.startswith("big "))
    bad = subprocess.run([str(BUILD), "big", str(tmp_path / "b"), "layers=1"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == UsageError.exit_code
    assert bad.stderr.count("\n") == 1 and "layers" in bad.stderr and "Traceback" not in bad.stderr


def test_exit_code_parameter_changes_only_the_app_layer(fixture_image: FixtureImages, tmp_path: Path) -> None:
    plain = fixture_image("busybox-sh")
    seven = build_image("busybox-sh", tmp_path / "seven", exit_code=7)
    assert seven.facts["exit_code"] == 7
    assert seven.manifests[0].layers[0] == plain.manifests[0].layers[0]
    assert seven.manifests[0].layers[1] != plain.manifests[0].layers[1]
    assert seven.manifests[0].layers[2] == plain.manifests[0].layers[2]


def test_hand_made_specs_are_written_like_catalogue_images(tmp_path: Path) -> None:
    from fixtures import ImageSpec, LayerBuilder, write_spec
    from fixtures.parts import busybox_base

    top = LayerBuilder("app").file("/app/x.sh", "#!/bin/sh\necho x\n", mode=0o755).whiteout("/etc/group")
    spec = ImageSpec("custom", (busybox_base(), top.build()), {"Entrypoint": ["/app/x.sh"]})
    result = write_spec(spec, tmp_path / "layout", "v1")
    assert result.reference == f"oci:{tmp_path / 'layout'}:v1"
    image = result.open()
    assert image.digest == result.digest and image.config["config"] == {"Entrypoint": ["/app/x.sh"]}
    entries = _entries(result)[1]
    assert [e.path for e in entries] == ["app", "app/x.sh", "etc", "etc/.wh.group"]
    assert write_spec(spec, tmp_path / "again", "v1").digest == result.digest
    with pytest.raises(ValueError, match="already has"):
        LayerBuilder("dup").file("/a", "1").file("/a", "2")
    with pytest.raises(ValueError, match="sorts before its target"):
        LayerBuilder("links").file("/b.conf", "x").hardlink("/b-link", "/b.conf").build()


def _difference(a: str, b: str) -> str:
    """Which blobs of two builds differ (config, or layer N), to tell a nondeterministic part apart."""
    from sconify.image.reference import parse_reference
    from sconify.image.transports import open_image

    first, second = open_image(parse_reference(a)), open_image(parse_reference(b))
    out = []
    if first.config_bytes != second.config_bytes:
        out.append(f"config differs: {first.config_bytes[:300]!r} vs {second.config_bytes[:300]!r}")
    for i, (x, y) in enumerate(zip(first.layers, second.layers, strict=False)):
        if x.descriptor.digest != y.descriptor.digest:
            out.append(f"layer {i} differs: DiffID {x.diff_id} vs {y.diff_id}")
    return "; ".join(out) or "manifests differ only in their own bytes"
