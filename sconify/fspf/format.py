"""The FSPF volume format, version 1: constants, regions, records and the byte layout of the metadata.

Everything here is plain data and byte layout; nothing here touches keys (that is ``crypto.py``). The
normative description is ``docs/fspf.md``; keep the two in step.
"""

from __future__ import annotations

import enum
import os
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from sconify.errors import IntegrityError, UnsafeArchiveError, UnsupportedError, UsageError

MAGIC = b"SCNYFSPF"
FORMAT_VERSION = 1
SUITE_HMAC_SIV_AES256GCM = 1
"""Cipher suite 1: HKDF-SHA256 key derivation, HMAC-SHA256 synthetic nonces, AES-256-GCM."""

HEADER_SIZE = 64
HEADER_PREFIX_SIZE = 40
"""The part of the header that the metadata nonce is computed over (everything before the nonce)."""
KEY_SIZE = 32
KEY_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
CHUNK_ENTRY_SIZE = NONCE_SIZE + TAG_SIZE

DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_METADATA_PATH = b"/.sconify/fspf/volume.fspf"

_HEADER = struct.Struct("<8sHHIQ16s12s12s")
assert _HEADER.size == HEADER_SIZE


class RegionMode(enum.IntEnum):
    """How the files under a region's prefix are kept at rest."""

    NOT_PROTECTED = 0
    AUTHENTICATED = 1
    ENCRYPTED = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @property
    def protected(self) -> bool:
        return self is not RegionMode.NOT_PROTECTED

    @classmethod
    def parse(cls, text: str) -> RegionMode:
        for mode in cls:
            if mode.label == text.strip().lower():
                return mode
        raise UsageError(f"Unknown region mode '{text}'; use one of encrypted, authenticated or not-protected.")


class RecordKind(enum.IntEnum):
    """What a metadata record describes."""

    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    HARDLINK = 4
    SPECIAL = 5
    """A character or block device or a FIFO; the type is in ``st_mode``."""

    @property
    def label(self) -> str:
        return self.name.lower()


def normalize_path(path: bytes | str, *, what: str = "path") -> bytes:
    """An absolute, normalised volume path as bytes: ``app/x``, ``./app/x`` and ``/app/x/`` become ``/app/x``.

    Raises UnsafeArchiveError for ``..`` components and NUL bytes, so that no path can leave the volume.
    """
    raw = os.fsencode(path) if isinstance(path, str) else bytes(path)
    if b"\0" in raw:
        raise UnsafeArchiveError(f"The {what} {raw!r} contains a NUL byte; remove the entry from the input.")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UnsafeArchiveError(
            f"The {what} {display_path(raw)} contains '..' and could leave the volume; remove the entry."
        )
    return b"/" + b"/".join(parts)


def display_path(path: bytes) -> str:
    """A path for messages: UTF-8 where it is, backslash escapes for other bytes."""
    return path.decode("utf-8", "backslashreplace")


def parent_paths(path: bytes) -> Iterator[bytes]:
    """The ancestors of a normalised path, nearest first, ending with ``/``."""
    while path != b"/":
        path = path.rsplit(b"/", 1)[0] or b"/"
        yield path


def is_below(path: bytes, prefix: bytes) -> bool:
    """True when ``path`` equals ``prefix`` or lies inside it, on whole path components."""
    return prefix == b"/" or path == prefix or path.startswith(prefix + b"/")


@dataclass(frozen=True)
class Region:
    """A path prefix and the protection of everything below it (unless a longer prefix says otherwise)."""

    prefix: bytes
    mode: RegionMode

    @classmethod
    def parse(cls, spec: str) -> Region:
        """Parse ``MODE:PREFIX``, e.g. ``encrypted:/app``."""
        mode_text, sep, prefix = spec.partition(":")
        if not sep or not prefix:
            raise UsageError(f"The region '{spec}' is not of the form MODE:PREFIX; write e.g. encrypted:/app.")
        if not prefix.startswith("/"):
            raise UsageError(f"The region prefix '{prefix}' must be absolute; write e.g. {mode_text}:/{prefix}.")
        return cls(normalize_path(prefix, what="region prefix"), RegionMode.parse(mode_text))

    def __str__(self) -> str:
        return f"{self.mode.label}:{display_path(self.prefix)}"


_DIR_MODES_MAX = 1 << 17  # directories whose mode a table keeps


@dataclass(frozen=True)
class RegionTable:
    """All regions of a volume, sorted by prefix; the root region ``/`` is always present."""

    regions: tuple[Region, ...]
    _by_prefix: Mapping[bytes, RegionMode] = field(init=False, repr=False, compare=False)
    _dir_modes: dict[bytes, RegionMode] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_prefix: dict[bytes, RegionMode] = {}
        for region in self.regions:
            if region.prefix != normalize_path(region.prefix, what="region prefix"):
                raise UsageError(f"The region prefix {region.prefix!r} is not normalised.")
            if region.prefix in by_prefix:
                raise UsageError(f"The region prefix {display_path(region.prefix)} is given twice; keep one of them.")
            by_prefix[region.prefix] = region.mode
        by_prefix.setdefault(b"/", RegionMode.NOT_PROTECTED)
        ordered = tuple(Region(p, by_prefix[p]) for p in sorted(by_prefix))
        object.__setattr__(self, "regions", ordered)
        object.__setattr__(self, "_by_prefix", by_prefix)
        object.__setattr__(self, "_dir_modes", {})

    @classmethod
    def of(cls, regions: Iterable[Region | str]) -> RegionTable:
        """A table from regions or ``MODE:PREFIX`` strings; ``/`` defaults to not-protected."""
        return cls(tuple(r if isinstance(r, Region) else Region.parse(r) for r in regions))

    def region_for(self, path: bytes) -> Region:
        """The region whose prefix is the longest one containing ``path``."""
        candidate = path
        while True:
            mode = self._by_prefix.get(candidate)
            if mode is not None:
                return Region(candidate, mode)
            candidate = candidate.rsplit(b"/", 1)[0] or b"/"

    def mode_for(self, path: bytes) -> RegionMode:
        """The mode of ``region_for(path)``, without making the region; each directory's answer is kept (the
        files of one directory share it)."""
        mode = self._by_prefix.get(path)
        if mode is not None:
            return mode
        parent = path.rsplit(b"/", 1)[0] or b"/"
        mode = self._dir_modes.get(parent)
        if mode is None:
            candidate = parent
            while (mode := self._by_prefix.get(candidate)) is None:
                candidate = candidate.rsplit(b"/", 1)[0] or b"/"
            if len(self._dir_modes) >= _DIR_MODES_MAX:
                self._dir_modes.clear()
            self._dir_modes[parent] = mode
        return mode

    def protected_at_or_below(self, path: bytes) -> bool:
        """True when ``path`` or anything inside it may be protected (so a walk must look inside)."""
        if self.mode_for(path).protected:
            return True
        return any(r.mode.protected and is_below(r.prefix, path) for r in self.regions)

    @property
    def protects_anything(self) -> bool:
        return any(r.mode.protected for r in self.regions)


@dataclass(frozen=True)
class Record:
    """One entry of a protected region as the metadata describes it.

    ``chunks`` holds, for a file, one 28-byte entry (12-byte nonce, 16-byte tag) per chunk, concatenated.
    ``target`` is the link target of a symlink or the volume path of a hard link's file.
    """

    path: bytes
    kind: RecordKind
    protection: RegionMode
    st_mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    size: int = 0
    chunks: bytes = b""
    target: bytes = b""
    devmajor: int = 0
    devminor: int = 0

    def chunk_count(self, chunk_size: int) -> int:
        return -(-self.size // chunk_size)

    def chunk_entry(self, index: int) -> tuple[bytes, bytes]:
        """The (nonce, tag) of chunk ``index``."""
        start = index * CHUNK_ENTRY_SIZE
        entry = self.chunks[start : start + CHUNK_ENTRY_SIZE]
        return entry[:NONCE_SIZE], entry[NONCE_SIZE:]


@dataclass(frozen=True)
class Header:
    """The plaintext, authenticated first 64 bytes of a metadata file."""

    version: int
    suite: int
    chunk_size: int
    body_length: int
    key_id: bytes
    nonce: bytes = bytes(NONCE_SIZE)

    def prefix(self) -> bytes:
        """The bytes the metadata nonce is computed over."""
        return self.encode()[:HEADER_PREFIX_SIZE]

    def encode(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.version,
            self.suite,
            self.chunk_size,
            self.body_length,
            self.key_id,
            self.nonce,
            bytes(12),
        )

    @classmethod
    def decode(cls, data: bytes, *, where: str) -> Header:
        """Parse and check the header at the start of a metadata file of ``len(data)`` bytes."""
        if len(data) < HEADER_SIZE + TAG_SIZE or data[:8] != MAGIC:
            raise IntegrityError(f"{where} is not an FSPF metadata file (no SCNYFSPF header).")
        magic, version, suite, chunk_size, body_length, key_id, nonce, reserved = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION or suite != SUITE_HMAC_SIV_AES256GCM:
            raise UnsupportedError(
                f"{where} uses FSPF format {version} with cipher suite {suite}; this sconify reads format "
                f"{FORMAT_VERSION} suite {SUITE_HMAC_SIV_AES256GCM} only, so use a matching sconify version."
            )
        if not valid_chunk_size(chunk_size) or reserved != bytes(12):
            raise IntegrityError(f"{where} has a malformed header; it was corrupted or tampered with.")
        if HEADER_SIZE + body_length + TAG_SIZE != len(data):
            raise IntegrityError(
                f"{where} is {len(data)} bytes but its header announces "
                f"{HEADER_SIZE + body_length + TAG_SIZE}; it was truncated, extended or tampered with."
            )
        return cls(version, suite, chunk_size, body_length, key_id, nonce)


def valid_chunk_size(size: int) -> bool:
    return MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE and size & (size - 1) == 0


@dataclass(frozen=True)
class Body:
    """The decrypted metadata: the region table and the records, both sorted."""

    regions: RegionTable
    records: tuple[Record, ...]


# -- encoding -------------------------------------------------------------------------------------

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RECORD_FIXED = struct.Struct("<BBHIIIq")
_REGION_FIXED = struct.Struct("<B3x")


def _put_bytes(out: bytearray, value: bytes) -> None:
    out += _U32.pack(len(value))
    out += value


def encode_body(regions: RegionTable, records: Iterable[Record], chunk_size: int) -> bytes:
    """The metadata plaintext: regions, then records sorted by path (see docs/fspf.md, "Body")."""
    ordered = sorted(records, key=lambda r: r.path)
    out = bytearray()
    out += _U32.pack(len(regions.regions))
    for region in regions.regions:
        out += _REGION_FIXED.pack(region.mode)
        _put_bytes(out, region.prefix)
    out += _U64.pack(len(ordered))
    for r in ordered:
        out += _RECORD_FIXED.pack(r.kind, r.protection, 0, r.st_mode, r.uid, r.gid, r.mtime_ns)
        _put_bytes(out, r.path)
        out += _U32.pack(len(r.xattrs))
        for name, value in r.xattrs:
            _put_bytes(out, name)
            _put_bytes(out, value)
        if r.kind is RecordKind.FILE:
            if len(r.chunks) != r.chunk_count(chunk_size) * CHUNK_ENTRY_SIZE:
                raise ValueError(f"record {r.path!r} has {len(r.chunks)} bytes of chunk entries for {r.size}")
            out += _U64.pack(r.size)
            out += r.chunks
        elif r.kind in (RecordKind.SYMLINK, RecordKind.HARDLINK):
            _put_bytes(out, r.target)
        elif r.kind is RecordKind.SPECIAL:
            out += struct.pack("<II", r.devmajor, r.devminor)
    return bytes(out)


class _Cursor:
    """Bounds-checked reading of the decrypted body; any overrun means the body is malformed."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.where = where

    def fail(self, what: str) -> IntegrityError:
        return IntegrityError(f"{self.where} has an authentic but malformed body ({what}); it cannot be used.")

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > len(self.data):
            raise self.fail(f"it ends early at byte {self.offset}")
        value = bytes(self.data[self.offset : self.offset + n])
        self.offset += n
        return value

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size))

    def bytes_field(self) -> bytes:
        (length,) = self.unpack(_U32)
        return self.take(length)


def decode_body(data: bytes, chunk_size: int, *, where: str) -> Body:
    """Parse and check a decrypted body (sorting, uniqueness, modes, links; see docs/fspf.md)."""
    cur = _Cursor(data, where)
    (region_count,) = cur.unpack(_U32)
    regions = []
    for _ in range(region_count):
        (mode,) = cur.unpack(_REGION_FIXED)
        prefix = cur.bytes_field()
        if mode not in RegionMode._value2member_map_ or prefix != normalize_path(prefix):
            raise cur.fail(f"region {prefix!r} is invalid")
        regions.append(Region(prefix, RegionMode(mode)))
    prefixes = [r.prefix for r in regions]
    if not prefixes or prefixes[0] != b"/" or prefixes != sorted(set(prefixes)):
        raise cur.fail("the region table is not sorted, not unique or has no root region")
    table = RegionTable(tuple(regions))
    (record_count,) = cur.unpack(_U64)
    records: list[Record] = []
    kinds: dict[bytes, Record] = {}
    previous = b""
    for _ in range(record_count):
        kind, protection, reserved, st_mode, uid, gid, mtime_ns = cur.unpack(_RECORD_FIXED)
        path = cur.bytes_field()
        if kind not in RecordKind._value2member_map_ or reserved:
            raise cur.fail(f"record {path!r} has an unknown kind")
        if path != normalize_path(path) or path == b"/" or path <= previous:
            raise cur.fail(f"record {path!r} is not normalised, not sorted or not unique")
        previous = path
        if protection != table.mode_for(path) or not RegionMode(protection).protected:
            raise cur.fail(f"record {path!r} does not have its region's protection")
        (xattr_count,) = cur.unpack(_U32)
        xattrs = tuple((cur.bytes_field(), cur.bytes_field()) for _ in range(xattr_count))
        fields: dict[str, object] = {}
        rkind = RecordKind(kind)
        if rkind is RecordKind.FILE:
            (size,) = cur.unpack(_U64)
            fields["size"] = size
            fields["chunks"] = cur.take(-(-size // chunk_size) * CHUNK_ENTRY_SIZE)
        elif rkind in (RecordKind.SYMLINK, RecordKind.HARDLINK):
            fields["target"] = cur.bytes_field()
        elif rkind is RecordKind.SPECIAL:
            fields["devmajor"], fields["devminor"] = cur.unpack(struct.Struct("<II"))
        record = Record(
            path,
            rkind,
            RegionMode(protection),
            st_mode,
            uid,
            gid,
            mtime_ns,
            xattrs,
            **fields,  # type: ignore[arg-type]
        )
        records.append(record)
        kinds[path] = record
    if cur.offset != len(cur.data):
        raise cur.fail("it has trailing bytes")
    for record in records:
        for parent in parent_paths(record.path):
            above = kinds.get(parent)
            if above is not None and above.kind is not RecordKind.DIRECTORY:
                raise cur.fail(f"record {record.path!r} lies below a non-directory")
        if record.kind is RecordKind.HARDLINK:
            target = kinds.get(record.target)
            if target is None or target.kind is not RecordKind.FILE or target.protection != record.protection:
                raise cur.fail(f"hard link {record.path!r} does not name a file of the same protection")
    return Body(table, tuple(records))


def kind_of_mode(st_mode: int) -> RecordKind:
    """The record kind for an ``lstat`` mode."""
    if stat.S_ISREG(st_mode):
        return RecordKind.FILE
    if stat.S_ISDIR(st_mode):
        return RecordKind.DIRECTORY
    if stat.S_ISLNK(st_mode):
        return RecordKind.SYMLINK
    return RecordKind.SPECIAL


def describe_mode(st_mode: int) -> str:
    """A word for the type of an ``lstat`` mode, for messages."""
    if stat.S_ISREG(st_mode):
        return "a regular file"
    if stat.S_ISDIR(st_mode):
        return "a directory"
    if stat.S_ISLNK(st_mode):
        return "a symlink"
    if stat.S_ISCHR(st_mode):
        return "a character device"
    if stat.S_ISBLK(st_mode):
        return "a block device"
    if stat.S_ISFIFO(st_mode):
        return "a FIFO"
    if stat.S_ISSOCK(st_mode):
        return "a socket"
    return "an unknown file type"
