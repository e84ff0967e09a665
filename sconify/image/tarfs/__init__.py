"""Layer tars for every part of sconify: a safe streaming reader, a deterministic writer, safe extraction.

``read_layer`` walks an untrusted layer as ``(Entry, content)`` pairs without holding contents in memory;
``LayerWriter`` writes entries back as a byte-stable PAX tar; ``extract`` unpacks layers into a directory
without ever writing outside it. The merged file tree of an image is in ``sconify.image.tree``.
"""

from sconify.image.tarfs.entry import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    Entry,
    EntryKind,
    decode_name,
    encode_name,
    entry_sort_key,
    path_sort_key,
    sorted_entries,
)
from sconify.image.tarfs.extract import ExtractReport, extract
from sconify.image.tarfs.reader import (
    DEFAULT_MAX_METADATA,
    DEFAULT_MAX_SIZE,
    ByteStream,
    EntryContent,
    read_layer,
)
from sconify.image.tarfs.writer import LayerWriter

__all__ = [
    "DEFAULT_MAX_METADATA",
    "DEFAULT_MAX_SIZE",
    "ByteStream",
    "OPAQUE_MARKER",
    "WHITEOUT_PREFIX",
    "Entry",
    "EntryContent",
    "EntryKind",
    "ExtractReport",
    "LayerWriter",
    "decode_name",
    "encode_name",
    "entry_sort_key",
    "extract",
    "path_sort_key",
    "read_layer",
    "sorted_entries",
]
