"""The ``docker-archive:FILE[:NAME:TAG|:@N]`` transport: ``docker save`` tar files, read in place and written so
that ``docker load`` (20.10 and later) and skopeo accept them.

Reading understands both forms Docker writes: the legacy one (``manifest.json`` whose ``Layers`` name
``<id>/layer.tar`` or ``<hex>.tar`` files, maybe through symlinks, and no registry manifest) and the form of
Docker >= 25 (the same ``manifest.json`` beside an OCI layout, files at ``blobs/sha256/<hex>``). When the OCI
index of the new form holds the image's real manifest, that manifest is used, so digests survive; otherwise a
deterministic Docker schema-2 manifest is synthesised from the files. Members are read in place through
``pread`` (no extraction, safe from several threads at once).

Writing produces the Docker >= 25 form with uncompressed layers, sorted members and fixed owners, modes and
times, so the same image gives a byte-identical archive:

    blobs/sha256/<hex>   config, layers (uncompressed tars, digest == DiffID) and the manifest
    index.json           OCI index naming the manifest (and NAME:TAG, as Docker 25 annotates it)
    manifest.json        [{"Config": "blobs/sha256/<hex>", "RepoTags": ["NAME:TAG"], "Layers": [...]}]
    oci-layout

``docker load`` only follows ``manifest.json`` (whatever the file names), skopeo too; the OCI layout beside it
lets sconify read the exact manifest back and makes the file an oci-archive as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from sconify.errors import (
    BadReferenceError,
    DestinationError,
    IntegrityError,
    NotFoundError,
    SconifyError,
    UnsafeArchiveError,
    UnsupportedError,
)
from sconify.image import mediatypes as mt
from sconify.image.model import Descriptor, Image, Platform, check_digest, parse_json_document, sha256_digest
from sconify.image.reference import DOCKER_DAEMON, Reference, parse_reference
from sconify.image.streams import CHUNK, DecompressingReader, detect_compression
from sconify.image.transports.base import MAX_DOCUMENT, read_limited, resolve_image, verify_document
from sconify.image.transports.oci import OciLayoutDestination
from sconify.image.transports.oci_archive import TarMemberStore, _MemberReader

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
LAYOUT_FILE = "oci-layout"
# Annotations Docker >= 25 puts on the index entry of a saved image.
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# Bounds on what an archive can make us do: link chains, documents read while looking for the manifest.
MAX_LINK_DEPTH = 16
MAX_INDEX_DOCUMENTS = 256
MAX_MANIFEST_ENTRIES = 10_000


class DockerArchiveStore(TarMemberStore):
    """Random access to the members of a docker-archive (a BlobSource and DocumentStore).

    Links between members (``docker save`` links repeated layers) are followed inside the archive only. A
    gzip or zstd compressed archive is first decompressed into an anonymous temporary file.
    """

    def __init__(self, path: Path, name: str, fileobj: IO[bytes] | None = None) -> None:
        self.path = path
        self.name = name
        if fileobj is None:
            fileobj = _open_archive_file(path, name)
        self._file = fileobj
        try:
            self._tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 - lives as long as the image
            infos = self._tar.getmembers()
        except (tarfile.TarError, OSError) as exc:
            fileobj.close()
            raise IntegrityError(
                f"{name}: {str(path)!r} is not a readable tar archive ({exc}); give a file written by docker save, "
                "skopeo or sconify."
            ) from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for info in infos:
            self.members[_member_key(info.name)] = info
        # Where blobs of a synthesised manifest live: digest -> member name.
        self.blob_paths: dict[str, str] = {}

    def resolve(self, member: str) -> tarfile.TarInfo:
        """The regular-file member a name leads to, following symlinks and hard links inside the archive."""
        key = _member_key(member)
        for _ in range(MAX_LINK_DEPTH):
            info = self.members.get(key)
            if info is None:
                raise NotFoundError(
                    f"{self.name}: {member!r} is missing from the archive; the archive is incomplete or corrupt."
                )
            if info.isreg() and not info.issparse():
                return info
            if info.issym():
                target = info.linkname
                joined = target if target.startswith("/") else posixpath.join(posixpath.dirname(key), target)
                key = _member_key(joined)
            elif info.islnk():
                key = _member_key(info.linkname)
            else:
                raise IntegrityError(f"{self.name}: {member!r} in the archive is not a regular file.")
            if key.startswith("../") or key == "..":
                raise UnsafeArchiveError(
                    f"{self.name}: {member!r} links outside the archive ({info.linkname!r}); the archive is unsafe."
                )
        raise IntegrityError(f"{self.name}: {member!r} is a chain of more than {MAX_LINK_DEPTH} links; it is corrupt.")

    def has_member(self, member: str) -> bool:
        try:
            self.resolve(member)
        except SconifyError:
            return False
        return True

    def open_member(self, member: str) -> BinaryIO:
        info = self.resolve(member)
        what = f"{member!r} in {self.name}"
        return _MemberReader(self._file.fileno(), info.offset_data, info.size, what)  # type: ignore[return-value]

    def member_size(self, member: str) -> int:
        return self.resolve(member).size

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return self.open_member(self.blob_paths.get(desc.digest) or f"blobs/{desc.algorithm}/{desc.hex}")

    def read_document(self, desc: Descriptor) -> bytes:
        with self.open_blob(desc) as f:
            return read_limited(f, f"document {desc.digest} in {self.name}")


def _member_key(name: str) -> str:
    """A member name as looked up: normalised, relative, without ``./``."""
    key = posixpath.normpath(name).lstrip("/")
    return "" if key == "." else key


def _open_archive_file(path: Path, name: str) -> IO[bytes]:
    """Open the archive; a compressed one is decompressed into an anonymous temporary file first."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - the store keeps it open as long as the image lives
    except FileNotFoundError:
        raise NotFoundError(
            f"{name}: file {str(path)!r} does not exist; give the path of a docker-archive (docker save -o FILE)."
        ) from None
    except IsADirectoryError:
        raise NotFoundError(
            f"{name}: {str(path)!r} is a directory, not an archive file; for an OCI layout directory use oci:DIR."
        ) from None
    except OSError as exc:
        raise NotFoundError(f"{name}: cannot open {str(path)!r} ({exc.strerror}).") from None
    head = f.read(16)
    f.seek(0)
    try:
        compression = detect_compression(head)
    except UnsupportedError:
        f.close()
        raise UnsupportedError(
            f"{name}: {str(path)!r} is compressed with bzip2 or xz; decompress it first (bunzip2 or unxz)."
        ) from None
    if compression == mt.NONE:
        return f
    log.info("%s is %s-compressed; decompressing it into a temporary file", path, compression)
    plain = tempfile.TemporaryFile(prefix="sconify-archive-")  # noqa: SIM115 - owned by the store
    try:
        with f, DecompressingReader(f, f"the archive {str(path)!r}") as src:  # type: ignore[arg-type]
            while chunk := src.read(CHUNK):
                plain.write(chunk)
        plain.flush()
        plain.seek(0)
    except BaseException:
        plain.close()
        raise
    return plain


@dataclass(frozen=True)
class ArchiveEntry:
    """One image listed in a docker-archive's ``manifest.json``."""

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def read_entries(store: DockerArchiveStore) -> list[ArchiveEntry]:
    """The images listed in ``manifest.json``, in order."""
    if MANIFEST_FILE not in store.members:
        if INDEX_FILE in store.members and LAYOUT_FILE in store.members:
            raise NotFoundError(
                f"{store.name}: {str(store.path)!r} holds an OCI layout but no manifest.json; "
                f"read it as oci-archive:{store.path}."
            )
        raise NotFoundError(
            f"{store.name}: {str(store.path)!r} has no manifest.json, so it is not a docker-archive; "
            "give a file written by docker save, skopeo or sconify."
        )
    with store.open_member(MANIFEST_FILE) as f:
        data = read_limited(f, f"manifest.json of {store.name}")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(
            f"manifest.json of {store.name} is not valid JSON ({exc}); the archive is corrupt."
        ) from None
    if not isinstance(raw, list) or len(raw) > MAX_MANIFEST_ENTRIES:
        raise IntegrityError(f"manifest.json of {store.name} is not a list of images; the archive is corrupt.")
    entries = []
    for i, item in enumerate(raw):
        what = f"entry {i} of manifest.json in {store.name}"
        if not isinstance(item, dict):
            raise IntegrityError(f"{what} is not a JSON object; the archive is corrupt.")
        config, tags, layers = item.get("Config"), item.get("RepoTags") or [], item.get("Layers")
        if not isinstance(config, str) or not config:
            raise IntegrityError(f"{what} names no Config file; the archive is corrupt.")
        if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
            raise IntegrityError(f"{what} has no valid Layers list; the archive is corrupt.")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise IntegrityError(f"{what} has an invalid RepoTags list; the archive is corrupt.")
        entries.append(ArchiveEntry(config, tuple(tags), tuple(layers)))
    return entries


def _normalised_tag(text: str) -> tuple[str | None, str | None, str | None] | None:
    """(registry, repository, tag) of a RepoTags entry as Docker would read it, or None if it is not a name."""
    try:
        ref = parse_reference(f"{DOCKER_DAEMON}:{text}")
    except SconifyError:
        return None
    return (ref.registry, ref.repository, ref.tag)


def choose_entry(entries: list[ArchiveEntry], ref: Reference, name: str) -> ArchiveEntry:
    """The entry a reference names: by ``@N``, by ``NAME:TAG`` among the RepoTags, or the only one."""
    tags = sorted({t for e in entries for t in e.repo_tags})
    listing = ", ".join(tags) or "none"
    if not entries:
        raise NotFoundError(f"{name}: the archive lists no images in manifest.json; it is empty.")
    if ref.index is not None:
        if ref.index >= len(entries):
            raise NotFoundError(
                f"{name}: the archive holds {len(entries)} image(s), so @{ref.index} does not exist; "
                f"use @0 to @{len(entries) - 1}."
            )
        return entries[ref.index]
    if ref.repository is not None:
        wanted = (ref.registry, ref.repository, ref.tag)
        for entry in entries:
            if any(_normalised_tag(t) == wanted for t in entry.repo_tags):
                return entry
        raise NotFoundError(
            f"{name}: no image tagged {ref.docker_name} in the archive (tags there: {listing}); "
            "name one of those or choose by position with :@N."
        )
    if len(entries) > 1:
        raise NotFoundError(
            f"{name} holds {len(entries)} images; name one with docker-archive:FILE:NAME:TAG or :@N "
            f"(tags: {listing})."
        )
    return entries[0]


def _blob_member(desc: Descriptor) -> str:
    return f"blobs/{desc.algorithm}/{desc.hex}"


def _walk_index(store: DockerArchiveStore, name: str) -> Iterator[tuple[bytes, Descriptor]]:
    """Every image manifest reachable from the archive's index.json whose blob is present, with its descriptor."""
    try:
        top = parse_json_document(store.read_member(INDEX_FILE), f"index.json of {name}")
    except SconifyError as exc:
        log.warning("%s: ignoring its index.json (%s)", name, exc)
        return
    pending = list(top.get("manifests") or []) if isinstance(top.get("manifests"), list) else []
    read = 0
    while pending and read < MAX_INDEX_DOCUMENTS:
        try:
            desc = Descriptor.from_json(pending.pop(0), f"an entry of index.json in {name}")
        except SconifyError:
            continue
        member = _blob_member(desc)
        if not store.has_member(member) or desc.size > MAX_DOCUMENT:
            continue  # other platforms' manifests are often left out of an archive
        read += 1
        data = verify_document(store.read_document(desc), desc, f"the manifest {desc.digest} in {name}")
        doc = parse_json_document(data, f"the manifest {desc.digest} in {name}")
        if desc.media_type in mt.INDEXES or isinstance(doc.get("manifests"), list):
            pending.extend(doc.get("manifests") or [])
        else:
            yield data, desc


def _real_manifest(
    store: DockerArchiveStore, entry: ArchiveEntry, config_digest: str, name: str
) -> tuple[bytes, str] | None:
    """The registry manifest of the entry from the OCI index of a Docker >= 25 archive, if it is there and
    agrees with manifest.json (early Docker 25 releases wrote manifests without their layers)."""
    if INDEX_FILE not in store.members:
        return None
    wanted_layers = [_member_key(p) for p in entry.layers]
    for data, desc in _walk_index(store, name):
        manifest = parse_json_document(data, f"the manifest {desc.digest} in {name}")
        config = manifest.get("config")
        layers = manifest.get("layers")
        if not isinstance(config, dict) or config.get("digest") != config_digest or not isinstance(layers, list):
            continue
        try:
            members = [_blob_member(Descriptor.from_json(d, f"a layer of {desc.digest}")) for d in layers]
        except SconifyError:
            continue
        if members != wanted_layers:
            log.info("%s: the manifest %s in index.json does not match manifest.json; ignoring it", name, desc.digest)
            continue
        return data, desc.media_type or mt.OCI_MANIFEST
    return None


def _layer_descriptor(store: DockerArchiveStore, member: str, diff_id: str, name: str) -> Descriptor:
    """The descriptor of a layer file: an uncompressed file's digest is its DiffID (verified when it is
    streamed); a compressed file is hashed here, once."""
    size = store.member_size(member)
    with store.open_member(member) as f:
        head = f.read(512)
        compression = detect_compression(head)
        if compression == mt.NONE:
            digest = check_digest(diff_id, f"DiffID of {member} in {name}")
        else:
            hasher = hashlib.sha256(head)
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
            digest = "sha256:" + hasher.hexdigest()
    return Descriptor(mt.layer_type("docker", compression), digest, size)


def synthesise_manifest(store: DockerArchiveStore, entry: ArchiveEntry, config: bytes, name: str) -> bytes:
    """A deterministic Docker schema-2 manifest for a legacy archive entry (which has no registry manifest)."""
    config_digest = sha256_digest(config)
    rootfs = parse_json_document(config, f"the config of {name}").get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(entry.layers):
        raise IntegrityError(
            f"{name}: the config lists {len(diff_ids or [])} layer DiffIDs but manifest.json names "
            f"{len(entry.layers)} layer files; the archive is corrupt."
        )
    layers = []
    for member, diff_id in zip(entry.layers, diff_ids, strict=True):
        desc = _layer_descriptor(store, member, diff_id, name)
        store.blob_paths.setdefault(desc.digest, member)
        layers.append(desc.to_json())
    store.blob_paths.setdefault(config_digest, entry.config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST,
        "config": Descriptor(mt.DOCKER_CONFIG, config_digest, len(config)).to_json(),
        "layers": layers,
    }
    return json.dumps(manifest, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def open_archive_image(store: DockerArchiveStore, ref: Reference, platform: Platform | None, name: str) -> Image:
    """Open the image a reference names in an opened docker-archive."""
    entry = choose_entry(read_entries(store), ref, name)
    config = store.read_member(entry.config)
    config_digest = sha256_digest(config)
    real = _real_manifest(store, entry, config_digest, name)
    if real is not None:
        data, media_type = real
    else:
        data, media_type = synthesise_manifest(store, entry, config, name), mt.DOCKER_MANIFEST
    # The config may live under any name; resolve_image reads it by digest.
    store.blob_paths.setdefault(config_digest, entry.config)
    return resolve_image(store, store, data, media_type, platform, name)


def open_docker_archive(ref: Reference, platform: Platform | None) -> Image:
    """Open the image ``docker-archive:FILE[:NAME:TAG|:@N]`` names, reading the archive in place."""
    name = str(ref)
    store = DockerArchiveStore(Path(ref.path or "."), name)
    return open_archive_image(store, ref, platform, name)


class DockerArchiveDestination(OciLayoutDestination):
    """Writes one image as a docker-archive: blobs are staged in a directory beside FILE, packed into a
    temporary file on commit and renamed over FILE; nothing appears at FILE before that."""

    accepted_compressions = frozenset({mt.NONE})
    preferred_compression = mt.NONE
    families: tuple[str, ...] = ("docker",)

    def __init__(self, ref: Reference) -> None:
        name = str(ref)
        if ref.index is not None:
            raise BadReferenceError(
                f"{name}: an image position @N only selects from an existing archive; "
                "name the image to write with docker-archive:FILE[:NAME:TAG]."
            )
        path = Path(ref.path or ".")
        if path.exists() and not path.is_file():
            raise DestinationError(f"{name}: {str(path)!r} exists and is not a file; choose another path.")
        parent = path.absolute().parent
        if not parent.is_dir():
            raise DestinationError(f"{name}: directory {str(parent)!r} does not exist; create it first.")
        self.archive = path
        self.ref = ref
        self.repo_tags: tuple[str, ...] = (ref.docker_name,) if ref.docker_name else ()
        try:
            self._work = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=parent))
        except OSError as exc:
            raise DestinationError(f"{name}: cannot write in {str(parent)!r} ({exc.strerror}).") from None
        self._manifest_bytes: bytes | None = None
        super().__init__(self._work / "layout", None, name)

    def put_manifest(self, data: bytes, media_type: str, platform: Platform | None = None) -> None:
        super().put_manifest(data, media_type, platform)
        self._manifest_bytes = data
        if self._manifest is not None and self.ref.repository:
            tag = self.ref.tag or "latest"
            annotations = {IMAGE_NAME_ANNOTATION: f"{self.ref.registry}/{self.ref.repository}:{tag}",
                           REF_NAME_ANNOTATION: tag}
            self._manifest = Descriptor(
                self._manifest.media_type, self._manifest.digest, self._manifest.size, annotations, platform
            )

    def stage(self) -> list[tuple[str, Path | None]]:
        """Complete the staged archive (index.json, oci-layout, manifest.json) and list its members in archive
        order, each with its file (None for a directory). Used by ``commit`` and by the daemon transport."""
        if self._manifest_bytes is None:
            raise DestinationError(f"{self.name}: nothing was written (no manifest); this is a bug in sconify.")
        manifest = parse_json_document(self._manifest_bytes, f"the manifest written to {self.name}")
        config = Descriptor.from_json(manifest.get("config"), "the config descriptor")
        layers = [Descriptor.from_json(d, "a layer descriptor") for d in manifest.get("layers") or []]
        super().commit()  # index.json and oci-layout; the staging directory becomes self.root
        items = [{"Config": _blob_member(config), "RepoTags": list(self.repo_tags),
                  "Layers": [_blob_member(d) for d in layers]}]
        (self.root / MANIFEST_FILE).write_bytes(json.dumps(items, separators=(",", ":")).encode() + b"\n")
        members: list[tuple[str, Path | None]] = [("blobs", None), ("blobs/sha256", None)]
        blob_dir = self.root / "blobs" / "sha256"
        members += [(f"blobs/sha256/{p.name}", p) for p in blob_dir.iterdir() if not p.name.startswith(".")]
        members += [(n, self.root / n) for n in (INDEX_FILE, MANIFEST_FILE, LAYOUT_FILE)]
        return sorted(members, key=lambda item: item[0])

    def commit(self) -> str:
        try:
            _write_archive(self.stage(), self.archive)
        except BaseException:
            self.abort()
            raise
        shutil.rmtree(self._work, ignore_errors=True)
        return f"docker-archive:{self.archive}" + (f":{self.repo_tags[0]}" if self.repo_tags else "")

    def abort(self) -> None:
        super().abort()
        shutil.rmtree(self._work, ignore_errors=True)


def _tar_header(name: str, size: int = 0, directory: bool = False) -> bytes:
    """A member header with fixed owner, mode and time, so that archives are reproducible."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_stream(members: list[tuple[str, Path | None]]) -> Iterator[bytes]:
    """The bytes of a tar of ``members`` (name, file or None for a directory), in bounded pieces; the same
    bytes Python's tarfile writes (512-byte blocks, two zero blocks, padded to a 10 KiB record)."""
    offset = 0
    for name, path in members:
        if path is None:
            header = _tar_header(name, directory=True)
            offset += len(header)
            yield header
            continue
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                continue
            size = st.st_size
            header = _tar_header(name, size)
            offset += len(header)
            yield header
            left = size
            while left and (chunk := f.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk
            if left:
                raise DestinationError(f"the staged file {str(path)!r} shrank while it was packed; write again.")
        padding = -size % tarfile.BLOCKSIZE
        offset += size + padding
        if padding:
            yield tarfile.NUL * padding
    end = 2 * tarfile.BLOCKSIZE
    end += -(offset + end) % tarfile.RECORDSIZE
    yield tarfile.NUL * end


def _write_archive(members: list[tuple[str, Path | None]], archive: Path) -> None:
    """Write the tar of ``members`` to a temporary file beside ``archive`` and rename it over ``archive``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in tar_stream(members):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DestinationError(f"cannot write the archive {str(archive)!r} ({exc.strerror or exc}).") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
