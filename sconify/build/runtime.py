"""The enclave runtime that a converted image starts with: the built-in open runtime (simulation mode), or
the runtime binary of a SCONE runtime image given with ``--runtime``."""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import sconify
from sconify.errors import ConversionError, NotFoundError
from sconify.image.model import Image
from sconify.image.tarfs import Entry, LayerWriter, read_layer
from sconify.image.tree import image_tree

RUNTIME_ENV = "SCONIFY_RUNTIME"
BUILTIN = Path(sconify.__file__).resolve().parent / "data" / "runtime" / "sconify-run"
MAX_RUNTIME = 256 << 20


@dataclass(frozen=True)
class Runtime:
    """The runtime binary's bytes and where they came from."""

    data: bytes
    origin: str


def builtin_runtime() -> Runtime:
    """The open runtime built by ``scripts/build-runtime`` (or the file named by ``$SCONIFY_RUNTIME``)."""
    path = Path(os.environ.get(RUNTIME_ENV) or BUILTIN)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"the built-in runtime {str(path)!r} is not built; run scripts/build-runtime, or give a SCONE runtime "
            "image with --runtime REF."
        ) from None
    if not data.startswith(b"\x7fELF"):
        raise ConversionError(
            f"the runtime {str(path)!r} is not an ELF program; rebuild it with scripts/build-runtime."
        )
    return Runtime(data, str(path))


def runtime_from_image(image: Image) -> Runtime:
    """The program a SCONE runtime image names as its entrypoint, read from the layer that supplies it."""
    entrypoint = (image.config.get("config") or {}).get("Entrypoint") or []
    if not entrypoint:
        raise ConversionError(f"the runtime image {image.name} has no Entrypoint naming its runtime program.")
    tree = image_tree(image)
    path = tree.resolve(str(entrypoint[0]).lstrip("/"))
    source = tree.content_source(path)
    if source is None:
        raise ConversionError(f"the runtime image's entrypoint {entrypoint[0]} is not a regular file.")
    member, layer_index = source
    layer = image.layers[layer_index]
    data: bytes | None = None
    with closing(layer.open_tar()) as tar:
        # Read the whole layer (not just up to the program) so that its digest and DiffID are checked.
        for entry, content in read_layer(tar, what=f"layer {layer_index} of {image.name}",
                                         needed=lambda e: e.path == member):
            if entry.path == member and content is not None:
                if entry.size > MAX_RUNTIME:
                    raise ConversionError(f"the runtime program {entrypoint[0]} is larger than 256 MiB.")
                data = content.read()
    if data is not None:
        return Runtime(data, f"{image.name}:{entrypoint[0]}")
    raise ConversionError(f"the runtime program {entrypoint[0]} was not found in {image.name}.")


def runtime_layer_entries(runtime: Runtime, runtime_path: str, mtime: Decimal) -> list[tuple[Entry, bytes | None]]:
    """The runtime layer: the runtime's directories and the program itself, owned by root."""
    parts = runtime_path.strip("/").split("/")
    out: list[tuple[Entry, bytes | None]] = []
    for depth in range(1, len(parts)):
        out.append((Entry.directory("/".join(parts[:depth]), mode=0o755, mtime=mtime), None))
    out.append((Entry.file("/".join(parts), len(runtime.data), mode=0o755, mtime=mtime), runtime.data))
    return out


def write_entries(out: object, entries: list[tuple[Entry, bytes | None]], mtime: Decimal) -> None:
    """Write a small new layer deterministically."""
    writer = LayerWriter(out, fixed_mtime=mtime, what="a new layer")  # type: ignore[arg-type]
    for entry, data in entries:
        writer.add(entry, data)
    writer.close()
