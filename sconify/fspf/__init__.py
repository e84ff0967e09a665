"""The file-system protection layer (FSPF): encrypted and authenticated regions of a file tree.

- ``VolumeWriter`` protects a stream of layer entries (what ``sconify.image.tarfs.read_layer`` yields)
  and returns the metadata file, the 32-byte key and the 16-byte tag for the policy.
- ``protect_directory`` does the same for a directory on disk, with a pool of worker threads.
- ``DirectoryVolume`` / ``open_volume`` verify and decrypt a whole tree, one file or one byte range.

The format is specified in ``docs/fspf.md``.
"""

from sconify.fspf.crypto import KeyFile, VolumeKey, parse_tag, read_key_file, write_key_file
from sconify.fspf.format import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_METADATA_PATH,
    Record,
    RecordKind,
    Region,
    RegionMode,
    RegionTable,
)
from sconify.fspf.reader import (
    ContentReader,
    FileIntegrityError,
    MetadataTamperedError,
    Problem,
    ProblemKind,
    ProtectedFile,
    StateMismatchError,
    Volume,
    WrongKeyError,
    open_volume,
)
from sconify.fspf.volume import DirectoryVolume, VerifyReport, protect_directory, verify_directory
from sconify.fspf.writer import ProtectedEntry, VolumeResult, VolumeWriter

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_METADATA_PATH",
    "ContentReader",
    "DirectoryVolume",
    "FileIntegrityError",
    "KeyFile",
    "MetadataTamperedError",
    "Problem",
    "ProblemKind",
    "ProtectedEntry",
    "ProtectedFile",
    "Record",
    "RecordKind",
    "Region",
    "RegionMode",
    "RegionTable",
    "StateMismatchError",
    "VerifyReport",
    "Volume",
    "VolumeKey",
    "VolumeResult",
    "VolumeWriter",
    "WrongKeyError",
    "open_volume",
    "parse_tag",
    "protect_directory",
    "read_key_file",
    "verify_directory",
    "write_key_file",
]
