"""Per-layer work of a conversion: a layer with nothing of an encrypted region is reused byte for byte; one
with such files is rewritten with their contents sealed in place and hidden older copies dropped. Either
way the chunk tags of the visible protected files are collected for the volume metadata."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from sconify.build.cache import CachedLayer, LayerCache
from sconify.build.scan import Scan
from sconify.errors import ConversionError
from sconify.fspf.crypto import SourcePosition, VolumeKey
from sconify.fspf.format import RegionMode, RegionTable
from sconify.fspf.writer import SealingStream, volume_path
from sconify.image import mediatypes as mt
from sconify.image.copy import transfer_layer
from sconify.image.model import Descriptor, Image, Layer, Readable
from sconify.image.streams import CHUNK, CheckedSource, GzipWriter, LayerSink, RangeFingerprint, TarWriter
from sconify.image.tarfs import Entry, EntryKind, LayerWriter, read_layer
from sconify.image.transports.base import Destination
from sconify.plan import LAYER_COMPRESSIONS, LayerAction
from sconify.progress import SILENT, Progress

log = logging.getLogger(__name__)

MAX_EXECUTABLE = 1 << 30  # the measured program is read whole; refuse absurd sizes
# ``auto`` stores a rewritten layer uncompressed when at least this share of its content is ciphertext: gzip
# could then save at most the rest, and pays a compression pass and a second hash over the whole layer.
CIPHERTEXT_SHARE_UNCOMPRESSED = 0.75


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
    verified: bool = False  # the source blob was read in full and verified while building this output


class _Collector:
    """Receives the chunk tags of each sealed file (the ``record_file`` side of SealingStream)."""

    def __init__(self) -> None:
        self.sealed: dict[bytes, tuple[int, bytes]] = {}

    def record_file(self, path: bytes, size: int, chunks: bytes) -> None:
        self.sealed[path] = (size, chunks)


class _Counting:
    """Adds the size of every read to a progress task."""

    def __init__(self, inner: Readable, update: Callable[[int], None]) -> None:
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


def _drain(stream: Readable) -> None:
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
        cache: LayerCache | None = None,
        compression: str = "auto",
        checks: Mapping[int, Sequence[RangeFingerprint]] | None = None,
        pipelined: bool = True,
    ) -> None:
        if compression not in LAYER_COMPRESSIONS:
            raise ValueError(f"unknown layer compression {compression!r}")
        self.compression = compression
        # Whether an uncompressed rewritten layer is hashed and written by a thread of its own: worth it when
        # there are fewer layers to rewrite than cores; otherwise the layers themselves keep the cores busy
        # and the hand-over between threads only costs. Gzip output always has its own thread.
        self.pipelined = pipelined
        # Builds running now, and the sinks of the rewrites among them: when a build ends and leaves a core
        # idle, the rewrites still running move their hashing and writing to a thread of their own, so that the
        # last big layer does not run on one core alone.
        self._lock = threading.Lock()
        self._running = 0
        self._sinks: set[LayerSink] = set()
        self._cores = os.cpu_count() or 1
        self._positional: dict[int, bool] = {}
        # Source layers the analysis read unverified: every read of them here also checks what it saw.
        self.checks = dict(checks or {})
        self.image = image
        self.scan = scan
        self.regions = regions
        self.key = key
        self.chunk_size = chunk_size
        self.dest = dest
        self.family = family
        self.executable = executable.lstrip("/") if executable else None
        self.progress = progress
        self.cache = cache
        # Layers that supply a visible protected entry or the measured program: only these are streamed.
        self._shielded_layers: set[int] = set()
        for node in scan.tree.walk():
            if node.path and not node.implicit and (self._mode(node.entry).protected or node.path == self.executable):
                self._shielded_layers.add(node.layer)
        self._visible_hash: dict[int, str] = {}
        if cache is not None:
            by_layer: dict[int, list[str]] = {}
            for node in scan.tree.walk():
                if node.path and not node.implicit:
                    by_layer.setdefault(node.layer, []).append(node.path)
            for layer_index, paths in by_layer.items():
                self._visible_hash[layer_index] = hashlib.sha256("\0".join(sorted(paths)).encode()).hexdigest()

    def _visible(self, index: int, entry: Entry) -> bool:
        node = self.scan.tree.get_entry_path(entry.path)
        return node is not None and node.layer == index and node.entry == entry

    def _mode(self, entry: Entry) -> RegionMode:
        return self.regions.mode_for(volume_path(entry.path))

    def _executable_bytes(self, entry: Entry, content: Readable | None) -> bytes:
        if entry.size > MAX_EXECUTABLE:
            raise ConversionError(f"the program /{entry.path} is larger than 1 GiB; sconify cannot measure it.")
        data = content.read() if content is not None else b""
        if len(data) != entry.size:
            raise ConversionError(f"the program /{entry.path} ended early while it was read; the layer is corrupt.")
        return data

    def _cache_key(self, action: LayerAction) -> str:
        layer = self.image.layers[action.index]
        supplies_program = self.executable is not None and self.scan.supplies(action.index, self.executable)
        return LayerCache.layer_key(
            {
                "digest": layer.descriptor.digest,
                "diff_id": layer.diff_id,
                "action": action.action,
                "visible": self._visible_hash.get(action.index, ""),
                "regions": [(r.prefix.hex(), int(r.mode)) for r in self.regions.regions],
                "key_id": self.key.key_id.hex(),
                "chunk_size": self.chunk_size,
                "nonces": "position v1" if self._position_nonces(action.index) else "synthetic",
                "program": self.executable if supplies_program else None,
                "family": self.family,
                "compression": self._output_compression(action),
                "accepted": sorted(self.dest.accepted_compressions),
            }
        )

    def build(self, action: LayerAction) -> LayerOutput:
        """The output of one source layer, from the cache when the same work was done before."""
        with self._lock:
            self._running += 1
        try:
            return self._build_cached(action)
        finally:
            with self._lock:
                self._running -= 1
                if self._running < self._cores:
                    for sink in self._sinks:
                        sink.go_background()

    def _sink(self, sink: LayerSink) -> LayerSink:
        """Register a rewrite's sink (see ``__init__``), in a thread of its own already if a core is idle."""
        with self._lock:
            self._sinks.add(sink)
            if self._running < self._cores:
                sink.go_background()
        return sink

    def _build_cached(self, action: LayerAction) -> LayerOutput:
        if self.cache is None:
            return self._build(action, None)
        key = self._cache_key(action)
        hit = self.cache.lookup(key)
        if hit is not None:
            return self._from_cache(action, hit)
        spool = self.cache.spool() if action.action == "rewrite" else None
        try:
            out = self._build(action, spool[1] if spool else None)
        except BaseException:
            if spool:
                spool[1].close()
                spool[0].unlink(missing_ok=True)
            raise
        if spool:
            spool[1].close()
        program_sealed = out.executable is not None and self._mode_of_path(self.executable) is RegionMode.ENCRYPTED
        if program_sealed:  # never keep plaintext of an encrypted file in the cache
            if spool:
                spool[0].unlink(missing_ok=True)
            return out
        self.cache.store(
            key,
            CachedLayer(out.descriptor, out.diff_id, out.action, out.records, out.executable, None),
            spool[0] if spool else None,
        )
        return out

    def _position_nonces(self, index: int) -> bool:
        """Whether layer ``index`` may be sealed with position nonces (docs/fspf.md, section 3.4): only when
        nothing sealed from it can leave this machine before its whole stream is verified. That holds when the
        destination stages everything locally until commit, or when the layer's bytes were verified before
        this pass (a registry blob kept in the conversion's spool). Otherwise (a local file read straight into
        a registry upload) the nonces are synthetic, a MAC of each chunk."""
        if getattr(self.dest, "stages_locally", False):
            return True
        layer = self.image.layers[index]
        holds = getattr(layer.source, "holds", None)
        return bool(holds is not None and holds(layer.descriptor.digest))

    def _nonce_position(self, index: int, offset: int) -> SourcePosition | None:
        """The position naming a content's nonces, or None for synthetic nonces (``_position_nonces``, decided
        once per layer)."""
        allowed = self._positional.get(index)
        if allowed is None:
            allowed = self._positional[index] = self._position_nonces(index)
        return SourcePosition(self.image.layers[index].diff_id, offset) if allowed else None

    def _layer(self, index: int) -> Layer:
        """Source layer ``index``, read through a check of the analysis's unverified reads where there were any."""
        layer = self.image.layers[index]
        prints = self.checks.get(index)
        if not prints:
            return layer
        return Layer(layer.descriptor, layer.diff_id, CheckedSource(layer.source, {layer.descriptor.digest: prints}))

    def verify_source(self, index: int) -> None:
        """Read source layer ``index`` in full, verified against its digest, size and DiffID (nothing is kept)."""
        layer = self._layer(index)
        with self.progress.task(f"verify layer {index}", layer.descriptor.size) as bar, layer.open_tar() as tar:
            _drain(_Counting(tar, bar.update))

    def _verified_by(self, index: int, transfer: str) -> bool:
        """Whether a transfer of source layer ``index`` verified it in full: digest, size and DiffID. A raw copy
        checks only the blob digest, which is the DiffID only for an uncompressed layer."""
        layer = self.image.layers[index]
        return transfer == "converted" or (transfer == "copied" and layer.descriptor.digest == layer.diff_id)

    def _mode_of_path(self, path: str | None) -> RegionMode:
        return self.regions.mode_for(volume_path(path)) if path else RegionMode.NOT_PROTECTED

    def _from_cache(self, action: LayerAction, hit: CachedLayer) -> LayerOutput:
        layer = self._layer(action.index)
        if hit.blob is not None:
            link = getattr(self.dest, "link_blob", None)  # local layouts share the cache's file instead of a copy
            if not self.dest.has_blob(hit.descriptor) and not (link is not None and link(hit.descriptor, hit.blob)):
                with (
                    open(hit.blob, "rb") as f,
                    self.progress.task(f"cached layer {action.index}", hit.descriptor.size) as bar,
                ):
                    self.dest.put_blob(hit.descriptor, f, bar.update)  # type: ignore[arg-type]
            return LayerOutput(action.index, hit.descriptor, hit.diff_id, "cached", hit.records, hit.executable)
        copy = transfer_layer(layer, self.dest, self.family, self.progress)
        return LayerOutput(action.index, copy.written, layer.diff_id, "cached", hit.records, hit.executable,
                           verified=self._verified_by(action.index, copy.action))

    def _build(self, action: LayerAction, spool: BinaryIO | None) -> LayerOutput:
        index = action.index
        layer = self._layer(index)
        what = f"layer {index} ({layer.descriptor.digest}) of {self.image.name or 'the image'}"
        needs_stream = index in self._shielded_layers
        records: list[ProtectedRecord] = []
        collector = _Collector()
        executable: bytes | None = None
        if action.action == "reuse":
            copy = transfer_layer(layer, self.dest, self.family, self.progress)
            if not needs_stream:
                return LayerOutput(index, copy.written, layer.diff_id, _ACTIONS[copy.action], (),
                                   verified=self._verified_by(index, copy.action))
            with self.progress.task(f"shield layer {index}", None) as bar, layer.open_tar() as tar:
                for entry, content in read_layer(tar, what=what, needed=lambda e: self._needs_content(index, e)):
                    offset = content.offset if content is not None else 0
                    if self._visible(index, entry) and entry.path == self.executable:
                        executable = self._executable_bytes(entry, content)
                        content = io.BytesIO(executable)  # type: ignore[assignment]
                    rec = self._protect(index, entry, content, offset, collector, bar.update)
                    if rec is not None:
                        records.append(rec)
                        if rec.chunks is None and entry.kind is EntryKind.REGULAR:
                            raise AssertionError("a regular protected entry must be sealed")
            return LayerOutput(index, copy.written, layer.diff_id, _ACTIONS[copy.action], tuple(records), executable,
                               verified=True)
        # Rewrite: the same entries in the same order, encrypted contents sealed, hidden encrypted copies dropped.
        compression = self._output_compression(action)
        size_hint = self._tar_size(index) if compression == mt.NONE else None
        writer = self.dest.new_blob(mt.layer_type(self.family, compression), size_hint)
        if spool is not None:
            writer = _Tee(writer, spool)
        # Compression and hashing run beside the tar parsing and sealing: two cores for one layer.
        gz = self._sink(GzipWriter(writer, background=True) if compression == mt.GZIP
                        else TarWriter(writer, background=self.pipelined))
        try:
            with self.progress.task(f"rewrite layer {index}", None) as bar, layer.open_tar() as tar:
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
                    offset = content.offset if content is not None else 0
                    if visible and entry.path == self.executable:
                        executable = self._executable_bytes(entry, content)
                        content = io.BytesIO(executable)  # type: ignore[assignment]
                    rec = self._protect(index, entry, content, offset, collector, bar.update, out, visible, mode)
                    if rec is not None:
                        records.append(rec)
                    elif entry.kind is EntryKind.REGULAR:
                        out.add(entry, _Counting(content, bar.update) if content is not None else None)
                    else:
                        out.add(entry)
                out.close()
                gz.close()
        except BaseException:
            gz.abandon()
            writer.abort()
            raise
        finally:
            with self._lock:
                self._sinks.discard(gz)
        desc = writer.commit()
        diff_id = gz.diff_id or desc.digest  # an uncompressed layer's DiffID is its digest
        return LayerOutput(index, desc, diff_id, "rewritten", tuple(records), executable, gz.uncompressed_size,
                           verified=True)

    def _tar_size(self, index: int) -> int:
        """About how long the rewritten tar of layer ``index`` is: the source tar's length, or an estimate."""
        layer = self.image.layers[index]
        if layer.descriptor.digest == layer.diff_id:
            return layer.descriptor.size
        facts = self.scan.layers[index]
        return sum(size for _, size, _ in facts.files) + 1536 * facts.entries

    def _output_compression(self, action: LayerAction) -> str:
        """How a rewritten layer is written: gzip (ciphertext in stored blocks) or an uncompressed tar."""
        accepted = self.dest.accepted_compressions
        if self.dest.preferred_compression == mt.NONE or self.compression == "none" and mt.NONE in accepted:
            return mt.NONE
        if self.compression == "gzip" or mt.NONE not in accepted:
            return mt.GZIP
        content = sum(size for _, size, _ in self.scan.layers[action.index].files)
        if content and action.encrypted_bytes >= CIPHERTEXT_SHARE_UNCOMPRESSED * content:
            return mt.NONE
        return mt.GZIP

    def _needs_content(self, index: int, entry: Entry) -> bool:
        if entry.kind is not EntryKind.REGULAR or not self._visible(index, entry):
            return False
        return self._mode(entry).protected or entry.path == self.executable

    def _protect(
        self,
        index: int,
        entry: Entry,
        content: Readable | None,
        offset: int,
        collector: _Collector,
        update: Callable[[int], None],
        out: LayerWriter | None = None,
        visible: bool | None = None,
        mode: RegionMode | None = None,
    ) -> ProtectedRecord | None:
        """Seal one visible protected entry (writing it to ``out`` when rewriting); None if not protected.

        Nonces name the content's place in the source layer (its DiffID and ``offset``, where the content
        starts in the tar stream) when ``_position_nonces`` allows it: the layer is read verified to its end
        before anything made from it is committed, so that place determines the plaintext (docs/fspf.md,
        section 3.4). Otherwise they are synthetic.
        """
        if not (self._visible(index, entry) if visible is None else visible) or not entry.path:
            return None
        if mode is None:
            mode = self._mode(entry)
        if not mode.protected:
            return None
        if entry.kind is not EntryKind.REGULAR:
            if out is not None:
                out.add(entry)
            return ProtectedRecord(entry)
        path = volume_path(entry.path)
        source = _Counting(content, update) if content is not None else None
        cipher = self.key.chunk_cipher(path, mode, self.chunk_size, self._nonce_position(index, offset))
        stream = SealingStream(collector, path, entry.size, source, cipher)  # type: ignore[arg-type]
        if out is not None:
            out.add(entry, stream)
        else:
            _drain(stream)  # type: ignore[arg-type]
        size, chunks = collector.sealed.pop(path)
        return ProtectedRecord(entry, size, chunks)


class _Tee:
    """A blob writer that also copies every byte into a spool file (the cache's copy of a sealed layer)."""

    def __init__(self, inner: Any, spool: BinaryIO) -> None:
        self._inner = inner
        self._spool = spool

    def write(self, data: bytes) -> int:
        self._spool.write(data)
        return self._inner.write(data)

    def commit(self) -> Descriptor:
        return self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()


_ACTIONS = {"present": "present", "mounted": "mounted", "copied": "reused", "converted": "recompressed"}
