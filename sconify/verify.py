"""``verify``: check a confidential image against its policy (the cosign signature of its manifest, MRENCLAVE
recomputed from the image, and the file-system protection of every protected file) and say what failed.

The three checks are independent: each one ends as ``ok``, ``failed`` (with one sentence on why) or ``skipped``,
and a failure of one does not stop the others. The image's layers are streamed once, two at a time, while the
merged tree is built: every protected regular file is verified chunk by chunk against the FSPF metadata as it
streams past, and the runtime and the measured program are kept on the way. Only the protection layer (small)
is read once more, first, to find the metadata; a layer is read again only when the runtime or the program
is reached through a link into another layer. Memory stays at one batch of chunks per layer stream, the
merged tree's small records, the metadata, and the two programs being measured.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sconify.enclave.measurement import measure
from sconify.enclave.settings import (
    DEFAULT_HEAP,
    DEFAULT_STACK,
    DEFAULT_THREADS,
    PAGE_SIZE,
    DlopenMode,
    EnclaveSettings,
    format_size,
    parse_size,
)
from sconify.errors import (
    IntegrityError,
    KeyMaterialError,
    NotFoundError,
    SconifyError,
    UnsafeArchiveError,
    UsageError,
    VerificationFailed,
)
from sconify.fspf.crypto import VolumeKey, parse_tag
from sconify.fspf.format import Record, RecordKind, display_path, normalize_path, parent_paths
from sconify.fspf.reader import ContentReader, Problem, ProblemKind, Volume, open_volume, size_problem
from sconify.fspf.writer import st_mode, volume_path
from sconify.image.model import Image, Platform
from sconify.image.reference import DOCKER, OCI, Reference
from sconify.image.tarfs import Entry, EntryKind, encode_name, read_layer
from sconify.image.transports import TransportOptions, open_image
from sconify.image.tree import FileTree, merge
from sconify.policy.session import load_session
from sconify.progress import SILENT, Progress

log = logging.getLogger(__name__)

OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"
CHECKS = ("signature", "mrenclave", "fspf")
PARALLEL_LAYERS = 2
MAX_METADATA = 1 << 30  # 28 bytes per 64 KiB chunk: 1 GiB of metadata describes more than 2 TiB of files
MAX_PROGRAM = 1 << 30  # as convert: the measured programs are read whole
MAX_PROBLEMS_SHOWN = 5  # in the one-line message; --json lists them all


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``ok``, ``failed`` or ``skipped``, one sentence, and facts for ``--json``."""

    name: str
    status: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "message": self.message, **dict(self.details)}


@dataclass(frozen=True)
class Verification:
    """Every check of one image against one policy service."""

    reference: str
    digest: str
    session: str
    service: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """True when no check failed (a skipped signature check does not fail the verification)."""
        return not self.failed

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if c.status == FAILED)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "session": self.session,
            "service": self.service,
            "ok": self.ok,
            "failed": list(self.failed),
            "checks": [c.to_json() for c in self.checks],
        }

    def error(self) -> VerificationFailed:
        """The one-sentence error for a verification that failed."""
        return VerificationFailed(
            f"{self.reference} does not hold up against service {self.service!r} of its policy: the "
            f"{' and '.join(self.failed)} check{'s' if len(self.failed) > 1 else ''} failed (see above); do not "
            "deploy it, convert the source again."
        )


# -- the policy ----------------------------------------------------------------------------------------------


def select_service(session: Mapping[str, Any], wanted: str | None, config_id: str | None) -> dict[str, Any]:
    """The policy service to check: ``wanted``, else the one the image's ``SCONE_CONFIG_ID`` names, else the
    only one."""
    services = [s for s in session.get("services") or [] if isinstance(s, dict)]
    names = [str(s.get("name")) for s in services]
    if wanted is not None:
        for service in services:
            if service.get("name") == wanted:
                return service
        raise UsageError(f"the policy has no service {wanted!r} (it has: {', '.join(names) or 'none'}); fix --service.")
    if config_id and "/" in config_id:
        session_name, _, service_name = config_id.rpartition("/")
        if session_name == session.get("name"):
            for service in services:
                if service.get("name") == service_name:
                    return service
    if len(services) == 1:
        return services[0]
    raise UsageError(
        f"the policy has {len(services)} services ({', '.join(names) or 'none'}) and the image's SCONE_CONFIG_ID "
        f"{config_id!r} picks none of them; choose one with --service."
    )


# -- the image's configuration ---------------------------------------------------------------------------


def image_env(image: Image) -> dict[str, str]:
    """The image's Env as a mapping (a later entry for the same name wins, as Docker merges them)."""
    out: dict[str, str] = {}
    for item in (image.config.get("config") or {}).get("Env") or []:
        name, sep, value = str(item).partition("=")
        if sep and name:
            out[name] = value
    return out


def settings_from_env(env: Mapping[str, str]) -> EnclaveSettings:
    """The enclave settings the runtime reads from its environment (``SCONE_HEAP``, ``SCONE_STACK``,
    ``SCONE_THREADS``, ``SCONE_ALLOW_DLOPEN``, ``SCONE_DEBUG``), parsed as the runtime parses them: an unset
    or empty variable means the default, sizes are rounded up to whole pages. UsageError for a bad value."""

    def size(name: str, what: str, default: int) -> int:
        text = env.get(name) or ""
        if not text:
            return default
        value = parse_size(text, name)
        value = (value + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        if value == 0:
            raise UsageError(f"{name} '{text}' gives an enclave {what} size of 0 bytes; give a size such as "
                             f"{format_size(default)}.")
        return value

    heap = size("SCONE_HEAP", "heap", DEFAULT_HEAP)
    stack = size("SCONE_STACK", "stack", DEFAULT_STACK)
    threads = DEFAULT_THREADS
    text = env.get("SCONE_THREADS") or ""
    if text:
        clean = text.strip().lower()
        if not clean.isascii() or not clean.isdigit():
            raise UsageError(f"SCONE_THREADS '{text}' is not a whole number; give a thread count such as 8.")
        threads = int(clean)
    dlopen = DlopenMode.OFF
    if env.get("SCONE_ALLOW_DLOPEN"):
        dlopen = DlopenMode.parse(env["SCONE_ALLOW_DLOPEN"])
    debug = False
    text = env.get("SCONE_DEBUG") or ""
    if text:
        clean = text.strip().lower()
        if clean not in ("0", "1"):
            raise UsageError(f"SCONE_DEBUG '{text}' is neither 0 nor 1.")
        debug = clean == "1"
    return EnclaveSettings(heap=heap, stack=stack, threads=threads, dlopen=dlopen, debug=debug)


# -- streaming the layers ------------------------------------------------------------------------------------


class _SequentialRead:
    """A positional read over a stream that is read front to back exactly once (what ``ContentReader.check``
    does when it verifies a whole file)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._pos = 0

    def __call__(self, view: memoryview, offset: int) -> int:
        if offset != self._pos:
            raise AssertionError(f"a layer member is read in order only (at {self._pos}, asked for {offset})")
        n = self._stream.readinto(view)
        self._pos += n
        return n


@dataclass
class _LayerResult:
    """What one pass over one layer found: its entries (for the tree), the outcome of each protected file it
    holds, and the programs to measure if it holds them."""

    entries: list[Entry] = field(default_factory=list)
    # path -> (the entry, None if it verified, else the problem); a later duplicate in the layer wins.
    sealed: dict[str, tuple[Entry, Problem | None]] = field(default_factory=dict)
    captured: dict[str, tuple[Entry, bytes]] = field(default_factory=dict)


def _read_program(content: Any, entry: Entry, what: str) -> bytes:
    if entry.size > MAX_PROGRAM:
        raise VerificationFailed(f"{what} /{entry.path} is larger than 1 GiB; sconify cannot measure it.")
    data = content.read() if content is not None else b""
    if len(data) != entry.size:
        raise IntegrityError(f"{what} /{entry.path} ended early while it was read; the layer is corrupt.")
    return data


class _ImageReader:
    """One streaming pass over every layer of an image, verifying protected files against a volume."""

    def __init__(self, image: Image, volume: Volume | None, programs: Sequence[str], progress: Progress) -> None:
        self.image = image
        self.volume = volume
        self.programs = frozenset(programs)  # layer paths whose bytes are kept for the measurement
        self.progress = progress

    def _what(self, index: int) -> str:
        layer = self.image.layers[index]
        return f"layer {index} ({layer.descriptor.digest}) of {self.image.name or 'the image'}"

    def _record(self, entry: Entry) -> Record | None:
        if self.volume is None or entry.kind is not EntryKind.REGULAR:
            return None
        record = self.volume.by_path.get(volume_path(entry.path))
        if record is None or record.kind is not RecordKind.FILE or record.size != entry.size:
            return None  # the tree check reports it (unexpected, type changed, size)
        return record

    def read_layer(self, index: int) -> _LayerResult:
        result = _LayerResult()
        reader = ContentReader(self.volume) if self.volume is not None else None

        def needed(entry: Entry) -> bool:
            return entry.kind is EntryKind.REGULAR and (entry.path in self.programs or self._record(entry) is not None)

        layer = self.image.layers[index]
        with self.progress.task(f"verify layer {index}") as bar, closing(layer.open_tar()) as tar:  # type: ignore[attr-defined]
            for entry, content in read_layer(tar, what=self._what(index), needed=needed):
                result.entries.append(entry)
                if content is None:
                    if entry.size == 0 and self._record(entry) is not None:
                        result.sealed[entry.path] = (entry, None)  # an empty file has no chunk to check
                    continue
                stream: Any = content
                if entry.path in self.programs:
                    data = _read_program(content, entry, "the program")
                    result.captured[entry.path] = (entry, data)
                    stream = io.BytesIO(data)
                record = self._record(entry)
                if record is not None:
                    assert reader is not None
                    problem = reader.check(record, _SequentialRead(stream), shown_path=record.path)
                    result.sealed[entry.path] = (entry, problem)
                    bar.update(record.size)
        return result

    def run(self) -> tuple[FileTree, list[_LayerResult]]:
        """Stream every layer (two at a time) and merge the tree in layer order."""
        count = len(self.image.layers)
        with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_LAYERS, count))) as pool:
            results = list(pool.map(self.read_layer, range(count)))
        return merge(r.entries for r in results), results

    def program_bytes(self, member: str, index: int) -> bytes | None:
        """Read one member of one layer again (for a program reached through a link into another layer)."""
        layer = self.image.layers[index]
        data = None
        with closing(layer.open_tar()) as tar:
            for entry, content in read_layer(tar, what=self._what(index), needed=lambda e: e.path == member):
                if entry.path == member and content is not None:
                    data = _read_program(content, entry, "the program")
        return data


def _find_metadata(image: Image, path: str) -> tuple[int, Entry, bytes] | None:
    """The metadata file at layer path ``path`` in the highest layer that has an entry there: (layer, entry,
    bytes); None if no layer has one. The merged tree later confirms that this entry is the visible one."""
    for index in range(len(image.layers) - 1, -1, -1):
        layer = image.layers[index]
        found: tuple[int, Entry, bytes] | None = None
        what = f"layer {index} ({layer.descriptor.digest}) of {image.name or 'the image'}"
        with closing(layer.open_tar()) as tar:
            for entry, content in read_layer(tar, what=what, needed=lambda e: e.path == path):
                if entry.path != path:
                    continue
                if entry.kind is not EntryKind.REGULAR or content is None:
                    found = (index, entry, b"")
                    continue
                if entry.size > MAX_METADATA:
                    raise VerificationFailed(f"the FSPF metadata /{path} is larger than 1 GiB; it is not sconify's.")
                found = (index, entry, content.read())
        if found is not None:
            return found
    return None


# -- the checks ------------------------------------------------------------------------------------------


def check_signature(
    ref: Reference, image: Image, key: Any | None, key_name: str | None, transport: TransportOptions | None
) -> Check:
    """Check (1): a cosign signature of the image's manifest digest, valid for ``key``, in the ``.sig`` tag."""
    from sconify.signing.cosign import signature_tag, verify_signature_image

    digest = image.digest
    if key is None:
        return Check("signature", SKIPPED, "no --key was given, so the signature was not checked.", {"digest": digest})
    if ref.transport not in (DOCKER, OCI):
        return Check(
            "signature",
            FAILED,
            f"{ref.transport}: images carry no cosign signature; verify the docker:// or oci: image that convert "
            "signed.",
            {"digest": digest},
        )
    tag = signature_tag(digest)
    sig_ref = Reference(ref.transport, registry=ref.registry, repository=ref.repository, tag=tag, path=ref.path)
    details = {"digest": digest, "signature_reference": str(sig_ref)}
    try:
        sig_image = open_image(sig_ref, None, transport)
    except NotFoundError:
        return Check(
            "signature",
            FAILED,
            f"there is no signature for {digest} (no tag {tag}): the image was not signed, or it changed after it "
            "was signed.",
            details,
        )
    try:
        verified = verify_signature_image(sig_image, key, digest)
    except (VerificationFailed, NotFoundError, IntegrityError) as exc:
        return Check("signature", FAILED, exc.message, details)
    return Check(
        "signature",
        OK,
        f"the manifest {digest} carries a valid cosign signature by {key_name or 'the key'}.",
        {**details, "docker_reference": verified.docker_reference},
    )


def _settings_text(settings: EnclaveSettings) -> str:
    return (
        f"heap {format_size(settings.heap)}, stack {format_size(settings.stack)}, {settings.threads} threads, "
        f"dlopen {settings.dlopen.label}, debug {'on' if settings.debug else 'off'}"
    )


@dataclass(frozen=True)
class _Programs:
    """Where the runtime and the measured program are, and the settings, as the image's config says."""

    runtime: str | None  # absolute path from the Entrypoint
    executable: str | None  # absolute path from SCONIFY_EXECUTABLE
    settings: EnclaveSettings | None
    problem: str | None  # why the MRENCLAVE check cannot run


def _programs(image: Image) -> _Programs:
    env = image_env(image)
    entrypoint = (image.config.get("config") or {}).get("Entrypoint") or []
    runtime = str(entrypoint[0]) if entrypoint else None
    executable = env.get("SCONIFY_EXECUTABLE") or None
    problem = None
    if runtime is None:
        problem = "the image has no Entrypoint, so it names no runtime to measure; it is not a converted image."
    elif not runtime.startswith("/"):
        problem = f"the image's Entrypoint {runtime!r} is not an absolute path; it is not a converted image."
    elif executable is not None and not executable.startswith("/"):
        problem = f"SCONIFY_EXECUTABLE '{executable}' in the image is not an absolute path; convert the image again."
    try:
        settings = settings_from_env(env)
    except UsageError as exc:
        return _Programs(runtime, executable, None, problem or f"the image's enclave settings are invalid: {exc}")
    return _Programs(runtime, executable, settings, problem)


def _program_from_tree(
    tree: FileTree, reader: _ImageReader, results: Sequence[_LayerResult], path: str, what: str
) -> bytes:
    """The bytes of the regular file that ``path`` names in the merged tree (links followed, as exec does)."""
    resolved = tree.resolve(path.lstrip("/"))
    source = tree.content_source(resolved)
    if source is None:
        node = tree.get(resolved)
        kind = "missing" if node is None else f"a {node.kind.value}, not a regular file"
        raise VerificationFailed(f"{what} {path} is {kind} in the image.")
    member, index = source
    kept = results[index].captured.get(member)
    if kept is not None:
        return kept[1]
    data = reader.program_bytes(member, index)
    if data is None:
        raise VerificationFailed(f"{what} {path} was not found in layer {index} of the image.")
    return data


def check_mrenclave(
    programs: _Programs,
    service: Mapping[str, Any],
    tree: FileTree | None,
    reader: _ImageReader,
    results: Sequence[_LayerResult],
) -> Check:
    """Check (2): MRENCLAVE of the image's runtime, program and settings is one the policy's service allows."""
    allowed = [str(m).lower() for m in service.get("mrenclaves") or []]
    details: dict[str, Any] = {
        "runtime": programs.runtime,
        "executable": programs.executable,
        "allowed": allowed,
    }
    if programs.problem is not None:
        return Check("mrenclave", FAILED, programs.problem, details)
    assert programs.settings is not None and programs.runtime is not None and tree is not None
    details["enclave"] = programs.settings.to_dict()
    try:
        runtime = _program_from_tree(tree, reader, results, programs.runtime, "the runtime")
        executable = (
            _program_from_tree(tree, reader, results, programs.executable, "the program")
            if programs.executable
            else None
        )
        measurement = measure(
            runtime,
            executable,
            programs.settings,
            runtime_name=f"the runtime {programs.runtime}",
            executable_name=f"the program {programs.executable}",
        )
    except (SconifyError, ValueError) as exc:
        return Check("mrenclave", FAILED, f"MRENCLAVE cannot be computed from the image: {exc}", details)
    mrenclave = measurement.mrenclave.hex()
    details["mrenclave"] = mrenclave
    program = programs.executable or "(none)"
    inputs = f"runtime {programs.runtime}, program {program}, {_settings_text(programs.settings)}"
    if mrenclave in allowed:
        return Check(
            "mrenclave", OK, f"MRENCLAVE {mrenclave} ({inputs}) is allowed by service {service.get('name')!r}.", details
        )
    return Check(
        "mrenclave",
        FAILED,
        f"the image measures MRENCLAVE {mrenclave} ({inputs}), which service {service.get('name')!r} does not allow "
        f"(it allows {', '.join(allowed) or 'nothing'}): the runtime, the program or an enclave setting was changed, "
        "or the policy belongs to another image.",
        details,
    )


def _fspf_inputs(service: Mapping[str, Any]) -> tuple[str, VolumeKey, bytes]:
    path, key, tag = service.get("fspf_path"), service.get("fspf_key"), service.get("fspf_tag")
    if not path or not key or not tag:
        raise VerificationFailed(
            f"service {service.get('name')!r} of the policy has no fspf_path, fspf_key and fspf_tag, so nothing "
            "can be checked; give the session.yml that convert wrote."
        )
    try:
        normalized = normalize_path(str(path), what="fspf_path")
        return normalized.decode("utf-8", "surrogateescape").lstrip("/"), VolumeKey.from_hex(str(key)), parse_tag(
            str(tag)
        )
    except (KeyMaterialError, UnsafeArchiveError) as exc:
        raise VerificationFailed(f"the policy's FSPF settings are malformed: {exc}") from None


_KINDS = {
    RecordKind.FILE: (EntryKind.REGULAR,),
    RecordKind.DIRECTORY: (EntryKind.DIRECTORY,),
    RecordKind.SYMLINK: (EntryKind.SYMLINK,),
    RecordKind.HARDLINK: (EntryKind.HARDLINK,),
    RecordKind.SPECIAL: (EntryKind.CHAR, EntryKind.BLOCK, EntryKind.FIFO),
}


def _tree_problems(
    tree: FileTree, volume: Volume, metadata_path: bytes, results: Sequence[_LayerResult]
) -> list[Problem]:
    """Every protected path of the merged tree against the metadata: presence, type, size, links, content."""
    problems: list[Problem] = []
    exempt = {metadata_path, *parent_paths(metadata_path)}
    seen: set[bytes] = set()
    for node in tree.walk():
        if not node.path or node.implicit:
            continue  # the root, and parents no layer lists (they carry nothing; runtimes make them 0755)
        path = volume_path(node.path)
        mode = volume.regions.mode_for(path)
        if not mode.protected or path in exempt:
            continue
        record = volume.by_path.get(path)
        entry = node.entry
        if record is None:
            problems.append(
                Problem(
                    path,
                    ProblemKind.UNEXPECTED,
                    f"is a {entry.kind.value} in a {mode.label} region that the metadata does not list: it was added, "
                    "or renamed from another path",
                )
            )
            continue
        seen.add(path)
        if entry.kind not in _KINDS[record.kind]:
            problems.append(
                Problem(path, ProblemKind.TYPE_CHANGED, f"is a {entry.kind.value}, expected a {record.kind.label}")
            )
            continue
        device = (entry.devmajor, entry.devminor)
        if record.kind is RecordKind.SPECIAL and st_mode(entry) & 0o170000 != record.st_mode & 0o170000:
            problems.append(Problem(path, ProblemKind.TYPE_CHANGED, f"is a {entry.kind.value}, expected another kind"))
        elif record.kind is RecordKind.SPECIAL and device != (record.devmajor, record.devminor):
            problems.append(
                Problem(
                    path,
                    ProblemKind.LINK_CHANGED,
                    f"has device {entry.devmajor},{entry.devminor}, expected {record.devmajor},{record.devminor}",
                )
            )
        elif record.kind is RecordKind.SYMLINK and encode_name(entry.linkname) != record.target:
            problems.append(
                Problem(
                    path,
                    ProblemKind.LINK_CHANGED,
                    f"points to {entry.linkname}, expected {display_path(record.target)}",
                )
            )
        elif record.kind is RecordKind.HARDLINK:
            target = record.target.decode("utf-8", "surrogateescape").lstrip("/")
            if volume_path(entry.linkname) != record.target or tree.content_source(node.path) != tree.content_source(
                target
            ):
                problems.append(
                    Problem(
                        path,
                        ProblemKind.LINK_CHANGED,
                        f"is a hard link to /{entry.linkname}, expected one to {display_path(record.target)}",
                    )
                )
        elif record.kind is RecordKind.FILE:
            if entry.size != record.size:
                problems.append(size_problem(path, entry.size, record.size))
                continue
            outcome = results[node.layer].sealed.get(node.path)
            if outcome is None or outcome[0] is not entry:
                problems.append(Problem(path, ProblemKind.UNREADABLE, "was not found while its layer streamed"))
            elif outcome[1] is not None:
                problems.append(outcome[1])
    for record in volume.records:
        if record.path not in seen:
            problems.append(
                Problem(record.path, ProblemKind.MISSING, "is missing: it was removed or renamed (or a parent was)")
            )
    problems.sort(key=lambda p: (p.path, p.kind))
    return problems


def _fspf_check(
    service: Mapping[str, Any],
    metadata: tuple[int, Entry, bytes] | None,
    metadata_path: str,
    volume: Volume | None,
    volume_error: str | None,
    tree: FileTree,
    results: Sequence[_LayerResult],
) -> Check:
    """Check (3): the metadata opens with the policy's key and tag, and every protected path verifies."""
    details: dict[str, Any] = {"fspf_path": "/" + metadata_path, "fspf_tag": service.get("fspf_tag")}
    if volume_error is not None:
        return Check("fspf", FAILED, volume_error, details)
    assert volume is not None and metadata is not None
    node = tree.get(metadata_path)
    if node is None or node.layer != metadata[0] or node.entry != metadata[1]:
        return Check(
            "fspf",
            FAILED,
            f"the FSPF metadata /{metadata_path} that the merged tree shows is not the one in layer {metadata[0]}: an "
            "upper layer removed or replaced it.",
            details,
        )
    problems = _tree_problems(tree, volume, normalize_path(metadata_path), results)
    records, files, total = len(volume.records), volume.files, volume.protected_bytes
    details.update(records=records, files=files, bytes=total)
    if problems:
        details["problems"] = [
            {"path": display_path(p.path), "kind": str(p.kind), "detail": p.detail} for p in problems
        ]
        shown = "; ".join(p.message for p in problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        count = "1 protected path fails" if len(problems) == 1 else f"{len(problems)} protected paths fail"
        return Check("fspf", FAILED, f"{count} verification: {shown}{more}.", details)
    return Check(
        "fspf",
        OK,
        f"the FSPF metadata /{metadata_path} opens with the policy's key and tag {volume.tag.hex()}, and all "
        f"{records} protected paths ({files} files, {total} bytes) verify.",
        details,
    )


# -- the whole verification ------------------------------------------------------------------------------


def verify_opened(
    ref: Reference,
    image: Image,
    session: Mapping[str, Any],
    *,
    key: Any | None = None,
    key_name: str | None = None,
    service_name: str | None = None,
    transport: TransportOptions | None = None,
    progress: Progress = SILENT,
) -> Verification:
    """Run the three checks on an opened image against a session (parsed YAML); problems are reported in the
    result, not raised. Errors that stop any check (a service that does not exist) are raised."""
    env = image_env(image)
    service = select_service(session, service_name, env.get("SCONE_CONFIG_ID"))
    checks = [check_signature(ref, image, key, key_name, transport)]

    programs = _programs(image)
    metadata_path = ""
    metadata = None
    volume: Volume | None = None
    volume_error: str | None = None
    try:
        metadata_path, volume_key, tag = _fspf_inputs(service)
        metadata = _find_metadata(image, metadata_path)
        if metadata is None or metadata[1].kind is not EntryKind.REGULAR:
            what = "is missing" if metadata is None else f"is a {metadata[1].kind.value}, not a file"
            volume_error = f"the FSPF metadata /{metadata_path} named by the policy {what} in the image."
        else:
            volume = open_volume(metadata[2], volume_key, tag, where=f"the FSPF metadata /{metadata_path}")
    except (VerificationFailed, IntegrityError, KeyMaterialError, UnsafeArchiveError) as exc:
        volume_error = exc.message

    wanted = [p.lstrip("/") for p in (programs.runtime, programs.executable) if p]
    reader = _ImageReader(image, volume, wanted, progress)
    tree: FileTree | None = None
    results: list[_LayerResult] = []
    read_error: str | None = None
    try:
        tree, results = reader.run()
    except (IntegrityError, UnsafeArchiveError, NotFoundError, VerificationFailed) as exc:
        read_error = f"the image cannot be read to the end: {exc.message}"

    if read_error is not None or tree is None:
        checks.append(Check("mrenclave", FAILED, read_error or "the image was not read."))
        checks.append(Check("fspf", FAILED, read_error or "the image was not read."))
    else:
        checks.append(check_mrenclave(programs, service, tree, reader, results))
        checks.append(_fspf_check(service, metadata, metadata_path, volume, volume_error, tree, results))
    return Verification(
        str(ref), image.digest, str(session.get("name")), str(service.get("name")), tuple(checks)
    )


def verify_image(
    ref: Reference,
    policy: Path,
    *,
    key_file: Path | None = None,
    service: str | None = None,
    platform: Platform | None = None,
    transport: TransportOptions | None = None,
    progress: Progress = SILENT,
) -> Verification:
    """Open ``ref`` and the policy file, load the public key if given, and run every check."""
    session = load_session(policy)
    key = None
    if key_file is not None:
        from sconify.signing.keys import load_verify_key

        key = load_verify_key(key_file)
    image = open_image(ref, platform, transport)
    return verify_opened(
        ref,
        image,
        session,
        key=key,
        key_name=str(key_file) if key_file is not None else None,
        service_name=service,
        transport=transport,
        progress=progress,
    )


def iter_lines(result: Verification) -> Iterator[str]:
    """One line per check, for people: ``name: status: sentence``."""
    width = max(len(c.name) for c in result.checks)
    for check in result.checks:
        status = "FAILED" if check.status == FAILED else check.status
        yield f"{(check.name + ':').ljust(width + 1)} {status}: {check.message}"


__all__ = [
    "CHECKS",
    "Check",
    "Verification",
    "check_mrenclave",
    "check_signature",
    "image_env",
    "iter_lines",
    "select_service",
    "settings_from_env",
    "verify_image",
    "verify_opened",
]
