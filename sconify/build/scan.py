"""The header scan: every layer's entries (no contents), the merged tree, and per-layer facts for the plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sconify.image.model import Image
from sconify.image.tarfs import Entry, EntryKind
from sconify.image.tree import FileTree
from sconify.plan import LayerFacts
from sconify.progress import SILENT, Progress


@dataclass(frozen=True)
class Scan:
    """The merged tree and what each layer holds."""

    tree: FileTree
    layers: tuple[LayerFacts, ...]

    def visible_paths(self) -> dict[str, str]:
        """Absolute path -> kind for every path of the merged tree."""
        return {"/" + node.path: str(node.kind) for node in self.tree.walk() if node.path}

    def supplies(self, layer: int, path: str) -> bool:
        """Whether ``layer`` supplies the visible version of ``path`` (a layer-relative path)."""
        node = self.tree.get(path)
        return node is not None and node.layer == layer and not node.implicit


def scan_from(image: Image, tree: FileTree, per_layer: Sequence[Sequence[Entry]]) -> Scan:
    """The scan of an image from the merged tree and every layer's entries (as the analysis read them)."""
    facts = []
    for index, (layer, entries) in enumerate(zip(image.layers, per_layer, strict=True)):
        files = []
        for entry in entries:
            kept = not entry.is_overlay_marker or entry.is_whiteout_meta  # not a whiteout or opaque marker
            if entry.kind in (EntryKind.REGULAR, EntryKind.HARDLINK) and kept:
                node = tree.get_entry_path(entry.path)
                visible = node is not None and node.layer == index and node.entry is entry
                files.append((entry.path, entry.size, visible))
        facts.append(
            LayerFacts(index, layer.descriptor.digest, layer.diff_id, layer.descriptor.size, len(entries), tuple(files))
        )
    return Scan(tree, tuple(facts))


def scan_image(image: Image, progress: Progress = SILENT) -> Scan:
    """Read every layer's headers (layers in parallel, each blob verified) and scan the image."""
    from sconify.analyze.files import LayerReader

    reader = LayerReader(image, progress=progress)
    tree, _, _ = reader.header_pass()
    return scan_from(image, tree, [h.entries for h in reader.headers])
