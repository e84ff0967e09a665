"""Per-layer work of a conversion: a layer with nothing of an encrypted region is reused byte for byte; one
with such files is rewritten with their contents sealed in place and hidden older copies dropped. Either
way the chunk tags of the visible protected files are collected for the volume metadata."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from sconify.build.scan import Scan
from sconify.errors import ConversionError
from sconify.fspf.crypto import VolumeKey
from sconify.fspf.format import RegionMode, RegionTable
from sconify.fspf.writer import SealingStream, volume_path
from sconify.image import mediatypes as mt
from sconify.image.copy import transfer_layer
from sconify.image.model import Descriptor, Image
from sconify.image.streams import CHUNK, GzipWriter
from sconify.image.tarfs import Entry, EntryKind, LayerWriter, read_layer
from sconify.image.transports.base import Destination
from sconify.plan import LayerAction
from sconify.progress import SILENT, Progress

log = logging.getLogger(__name__)

MAX_EXECUTABLE = 1 << 30  # the measured program is read whole; refuse absurd sizes


@dataclass(frozen=True)
class ProtectedRecord:
    """One visible protected entry of a layer, with its chunk tags when it is a regular file."""

    entry: Entry
    size: int | None = None
    chunks: bytes | None = None


@dataclass(frozen=True)
class LayerOutput:
    """A source layer as it appears in the output image."""

    index: int
    descriptor: Descriptor
    diff_id: str
    action: str  # reused, mounted, present, rewritten
    records: tuple[ProtectedRecord, ...]
    executable: bytes | None = None
    uncompressed_size: int | None = None


class _Collector:
    """Receives the chunk tags of each sealed file (the ``record_file`` side of SealingStream)."""

    def __init__(self) -> None:
        self.sealed: dict[bytes, tuple[int, bytes]] = {}

    def record_file(self, path: bytes, size: int, chunks: bytes) -> None:
        self.sealed[path] = (size, chunks)


class _Counting:
    """Adds the size of every read to a progress task."""

    def __init__(self, inner: BinaryIO, update: Callable[[int], None]) -> None:
        self._inner = inner
        self._update = update

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self._update(len(data))
        return data

    def readinto(self, view: memoryview) -> int:
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


def _drain(stream: BinaryIO) -> None:
    while stream.read(CHUNK):
        pass


class LayerBuilder:
    """Everything the per-layer work shares: the image, the scan, the regions, the key and the destination."""

    def __init__(
        self,
        image: Image,
        scan: Scan,
        regions: RegionTable,
        key: VolumeKey,
        chunk_size: int,
        dest: Destination,
        family: str,
        executable: str | None,
        progress: Progress = SILENT,
    ) -> None:
        self.image = image
        self.scan = scan
        self.regions = regions
        self.key = key
        self.chunk_size = chunk_size
        self.dest = dest
        self.family = family
        self.executable = executable.lstrip("/") if executable else None
        self.progress = progress
        # Layers that supply a visible protected entry or the measured program: only these are streamed.
        self._shielded_layers: set[int] = set()
        for node in scan.tree.walk():
            if node.path and not node.implicit and (self._mode(node.entry).protected or node.path == self.executable):
                self._shielded_layers.add(node.layer)

    def _visible(self, index: int, entry: Entry) -> bool:
        node = self.scan.tree.get(entry.path)
        return node is not None and node.layer == index and node.entry == entry

    def _mode(self, entry: Entry) -> RegionMode:
        return self.regions.mode_for(volume_path(entry.path))

    def _executable_bytes(self, entry: Entry, content: BinaryIO | None) -> bytes:
        if entry.size > MAX_EXECUTABLE:
            raise ConversionError(f"the program /{entry.path} is larger than 1 GiB; sconify cannot measure it.")
        data = content.read() if content is not None else b""
        if len(data) != entry.size:
            raise ConversionError(f"the program /{entry.path} ended early while it was read; the layer is corrupt.")
        return data

    def build(self, action: LayerAction) -> LayerOutput:
        index = action.index
        layer = self.image.layers[index]
        what = f"layer {index} ({layer.descriptor.digest}) of {self.image.name or 'the image'}"
        needs_stream = index in self._shielded_layers
        records: list[ProtectedRecord] = []
        collector = _Collector()
        executable: bytes | None = None
        if action.action == "reuse":
            copy = transfer_layer(layer, self.dest, self.family, self.progress)
            if not needs_stream:
                return LayerOutput(index, copy.written, layer.diff_id, _ACTIONS[copy.action], ())
            with self.progress.task(f"shield layer {index}", None) as bar, layer.open_tar() as tar:
                for entry, content in read_layer(tar, what=what, needed=lambda e: self._needs_content(index, e)):
                    if self._visible(index, entry) and entry.path == self.executable:
                        executable = self._executable_bytes(entry, content)
                        content = io.BytesIO(executable)
                    rec = self._protect(index, entry, content, collector, bar.update)
                    if rec is not None:
                        records.append(rec)
                        if rec.chunks is None and entry.kind is EntryKind.REGULAR:
                            raise AssertionError("a regular protected entry must be sealed")
            return LayerOutput(index, copy.written, layer.diff_id, _ACTIONS[copy.action], tuple(records), executable)
        # Rewrite: the same entries in the same order, encrypted contents sealed, hidden encrypted copies dropped.
        writer = self.dest.new_blob(mt.layer_type(self.family, mt.GZIP))
        try:
            with self.progress.task(f"rewrite layer {index}", None) as bar, layer.open_tar() as tar:
                gz = GzipWriter(writer)
                out = LayerWriter(gz, what=f"the rewritten {what}")
                for entry, content in read_layer(tar, what=what):
                    visible = self._visible(index, entry)
                    mode = self._mode(entry)
                    if (
                        mode is RegionMode.ENCRYPTED
                        and not visible
                        and entry.kind in (EntryKind.REGULAR, EntryKind.HARDLINK)
                    ):
                        continue  # an older copy hidden by an upper layer: its plaintext must not ship
                    if visible and entry.path == self.executable:
                        executable = self._executable_bytes(entry, content)
                        content = io.BytesIO(executable)
                    rec = self._protect(index, entry, content, collector, bar.update, out)
                    if rec is not None:
                        records.append(rec)
                    elif entry.kind is EntryKind.REGULAR:
                        out.add(entry, _Counting(content, bar.update) if content is not None else None)
                    else:
                        out.add(entry)
                out.close()
                gz.close()
        except BaseException:
            writer.abort()
            raise
        desc = writer.commit()
        return LayerOutput(index, desc, gz.diff_id, "rewritten", tuple(records), executable, gz.uncompressed_size)

    def _needs_content(self, index: int, entry: Entry) -> bool:
        if entry.kind is not EntryKind.REGULAR or not self._visible(index, entry):
            return False
        return self._mode(entry).protected or entry.path == self.executable

    def _protect(
        self,
        index: int,
        entry: Entry,
        content: BinaryIO | None,
        collector: _Collector,
        update: Callable[[int], None],
        out: LayerWriter | None = None,
    ) -> ProtectedRecord | None:
        """Seal one visible protected entry (writing it to ``out`` when rewriting); None if not protected."""
        if not self._visible(index, entry) or not entry.path:
            return None
        mode = self._mode(entry)
        if not mode.protected:
            return None
        if entry.kind is not EntryKind.REGULAR:
            if out is not None:
                out.add(entry)
            return ProtectedRecord(entry)
        path = volume_path(entry.path)
        source = _Counting(content, update) if content is not None else None
        stream = SealingStream(collector, path, entry.size, source, self.key.chunk_cipher(path, mode, self.chunk_size))  # type: ignore[arg-type]
        if out is not None:
            out.add(entry, stream)
        else:
            _drain(stream)  # type: ignore[arg-type]
        size, chunks = collector.sealed.pop(path)
        return ProtectedRecord(entry, size, chunks)


_ACTIONS = {"present": "present", "mounted": "mounted", "copied": "reused", "converted": "recompressed"}
