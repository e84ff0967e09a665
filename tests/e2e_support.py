"""Shared set-up of the end-to-end tests: fixture images converted by ``sconify convert``, loaded into the test
Docker engine next to their native originals, run with their sessions mounted, and tampered with by new layers.

No test lives here; the ``test_e2e_*`` modules import from it. Conversions and loads are cached per test run in a
module-level dictionary (as ``test_convert_support`` does), so every module asking for the same image gets the
same conversion and the engine loads it once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra.dockerd import DockerEngine
from test_convert_support import Converted, Keys, blob_path, convert_image, layout_manifest, real_runtime

from sconify.image import mediatypes as mt
from sconify.image.copy import write_image
from sconify.image.model import canonical_json
from sconify.image.reference import parse_reference
from sconify.image.streams import GzipWriter
from sconify.image.tarfs import Entry, LayerWriter
from sconify.image.transports import open_destination, open_image
from sconify.image.transports.oci import OciLayoutDestination

SESSION_PATH = "/run/sconify/session.yml"  # where docs/runtime.md mounts the session
REPOSITORY = "sconify-e2e"

# Exit codes of sconify-run (docs/runtime.md section 8).
EXIT_NO_SESSION = 221
EXIT_WRONG_SESSION = 223
EXIT_MEASUREMENT = 225
EXIT_PROTECTION = 226
EXIT_HOST_ARGS = 227
EXIT_READ_ONLY = 228

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def require_runtime() -> None:
    """Skip when the open runtime is not built: without it a converted image cannot start."""
    if not real_runtime():
        pytest.skip("the open runtime is not built; run scripts/build-runtime")


def copy_image(source: str, destination: str) -> str:
    """What ``sconify copy SOURCE DESTINATION`` does: the library calls of the command, without its output."""
    return write_image(open_image(parse_reference(source)), open_destination(parse_reference(destination))).digest


def session_options(policy: Path | None) -> tuple[str, ...]:
    """The ``docker run`` options that mount ``policy`` read-only and name it, as docs/runtime.md shows."""
    if policy is None:
        return ()
    return ("-v", f"{policy}:{SESSION_PATH}:ro", "-e", f"SCONIFY_SESSION_FILE={SESSION_PATH}")


def run_converted(dockerd: DockerEngine, image: str, policy: Path | None, *args: str,
                  options: tuple[str, ...] = ()) -> Any:
    """``docker run --rm --network=none`` of a converted image with its session mounted (none when ``policy`` is
    None), host arguments ``args`` after the image name."""
    return dockerd.run_container(image, *args, options=(*session_options(policy), *options))


@dataclass(frozen=True)
class Pair:
    """A fixture image loaded into the engine twice: as built (``native``) and as converted (``converted``)."""

    name: str
    source: Any  # fixtures.BuildResult
    native: str
    converted: str
    conversion: Converted

    @property
    def policy(self) -> Path:
        return self.conversion.policy


def _cached(key: str, make: Any) -> Any:
    with _LOCK:
        if key not in _STATE:
            _STATE[key] = make()
        return _STATE[key]


def convert_to_archive(tmp_path_factory: pytest.TempPathFactory, source: Any, keys: Keys, variant: str = "default",
                       **options: Any) -> tuple[Converted, Path, str]:
    """The fixture image ``source`` converted straight into a docker-archive tar, once per run for each
    ``variant`` (the name of ``options``); returns the conversion, the archive and the image name in it."""
    def make() -> tuple[Converted, Path, str]:
        base = tmp_path_factory.mktemp(f"e2e-{source.name}-{variant}")
        image = f"{REPOSITORY}/{source.name}:{variant}"
        archive = base / "converted.tar"
        converted = convert_image(source, f"docker-archive:{archive}:{image}", base / "policy", keys, sign=False,
                                  **options)
        return converted, archive, image

    return _cached(f"archive:{source.layout}:{variant}", make)


def loaded_conversion(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, source: Any, keys: Keys,
                      variant: str = "default", **options: Any) -> tuple[Converted, str]:
    """``convert_to_archive`` loaded into the engine; returns the conversion and the image name."""
    require_runtime()
    converted, archive, image = convert_to_archive(tmp_path_factory, source, keys, variant, **options)
    return converted, load_once(dockerd, archive, image)


def load_once(dockerd: DockerEngine, archive: Path, image: str) -> str:
    """Load ``archive`` into the engine unless this run already did; returns ``image``."""
    def load() -> str:
        done = dockerd.load(archive)
        assert image in done.stdout, done.stdout
        return image

    return _cached(f"loaded:{dockerd.root}:{image}", load)


def native_image(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, source: Any) -> str:
    """The fixture image as built, copied into a docker-archive (like ``sconify copy``) and loaded."""
    def make() -> tuple[Path, str]:
        image = f"{REPOSITORY}/{source.name}:native-{sha256_hex(str(source.layout).encode())[:12]}"
        archive = tmp_path_factory.mktemp(f"e2e-native-{source.name}") / "native.tar"
        copy_image(source.reference, f"docker-archive:{archive}:{image}")
        return archive, image

    archive, image = _cached(f"native:{source.layout}", make)
    return load_once(dockerd, archive, image)


def loaded_pair(dockerd: DockerEngine, tmp_path_factory: pytest.TempPathFactory, fixture_image: Any, keys: Keys,
                name: str, **params: Any) -> Pair:
    """The native and the converted image of fixture ``name`` (built with ``params``), both in the engine."""
    source = fixture_image(name, **params)
    variant = "-".join(f"{k}-{v}" for k, v in sorted(params.items())) or "default"
    conversion, converted = loaded_conversion(dockerd, tmp_path_factory, source, keys, variant)
    return Pair(name, source, native_image(dockerd, tmp_path_factory, source), converted, conversion)


def image_config(dockerd: DockerEngine, image: str) -> dict[str, Any]:
    """``docker image inspect``'s ``Config`` of ``image``."""
    return json.loads(dockerd.run("image", "inspect", image, check=True).stdout)[0]["Config"]


def image_env(dockerd: DockerEngine, image: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in image_config(dockerd, image).get("Env") or [])


def other_session(policy: Path, dest: Path, **changes: Any) -> Path:
    """A copy of the session file ``policy`` with fields of its (only) service changed, mode 0600."""
    session = yaml.safe_load(policy.read_text())
    session["services"][0].update(changes)
    dest.write_text(yaml.safe_dump(session, sort_keys=False))
    dest.chmod(0o600)
    return dest


# -- layers on top of a converted OCI layout, written with the library -----------------------------------------


def stored_file(layout: Path, path: str, tag: str = "latest") -> tuple[tarfile.TarInfo, bytes]:
    """The header and bytes of ``path`` as the image stores it (the topmost layer that has it), read with
    Python's tarfile from the layout's blobs, not with the code under test."""
    _, manifest = layout_manifest(layout, tag)
    found: tuple[tarfile.TarInfo, bytes] | None = None
    for desc in manifest["layers"]:
        data = blob_path(layout, desc["digest"]).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.name.lstrip("./").rstrip("/") == path.lstrip("/") and member.isfile():
                    content = tar.extractfile(member)
                    assert content is not None
                    found = (member, content.read())
    if found is None:
        raise KeyError(f"{path} is in no layer of {layout}")
    return found


def add_layer(layout: Path, files: Iterable[tuple[str, bytes, tarfile.TarInfo]], new_tag: str,
              tag: str = "latest") -> str:
    """Add one layer with ``files`` (path, content, the header whose mode, owner and mtime to keep) on top of
    ``layout:tag`` and tag the result ``new_tag`` in the same layout; returns its ``oci:`` reference."""
    _, manifest = layout_manifest(layout, tag)
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())
    dest = OciLayoutDestination(layout, new_tag, f"oci:{layout}:{new_tag}")
    blob = dest.new_blob(mt.OCI_LAYER_GZIP)
    gz = GzipWriter(blob)  # type: ignore[arg-type]
    writer = LayerWriter(gz, what="the tampering layer")
    for path, content, header in sorted(files, key=lambda item: item[0]):
        entry = Entry.file(path.lstrip("/"), len(content), mode=header.mode, uid=header.uid, gid=header.gid,
                           mtime=int(header.mtime))
        writer.add(entry, io.BytesIO(content))
    writer.close()
    gz.close()
    layer = blob.commit()
    config["rootfs"]["diff_ids"].append(gz.diff_id)
    config.setdefault("history", []).append({"created_by": "e2e test: a layer added on top"})
    config_desc = dest.put_document(canonical_json(config), manifest["config"]["mediaType"])
    manifest = dict(manifest, config=config_desc.to_json(), layers=[*manifest["layers"], layer.to_json()])
    manifest.pop("annotations", None)  # they describe the conversion's output, which this is not any more
    dest.put_manifest(canonical_json(manifest), manifest.get("mediaType", mt.OCI_MANIFEST))
    return dest.commit()


def private_layout(conversion: Converted, dest: Path) -> Path:
    """A copy of a conversion's OCI layout that a test may add tags to (cached layouts are shared)."""
    assert conversion.layout is not None
    shutil.copytree(conversion.layout, dest)
    return dest


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
