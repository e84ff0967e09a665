"""``analyze(image, rules) -> Analysis``: what an image runs and how sconify proposes to protect it.

The Analysis is plain frozen data with a stable JSON form (``to_json``, ``schema_version``; documented in
``docs/analysis-schema.md``). Reading is done by ``sconify.analyze.files`` (one header pass, then a few
batched content rounds); everything else here is pure and re-run after each round with what was read.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sconify.analyze import findings as fc
from sconify.analyze.chain import Chain, Step, follow_command
from sconify.analyze.command import (
    Command,
    User,
    compose_command,
    parse_env,
    resolve_user,
    search_path,
    working_dir,
)
from sconify.analyze.elf import ElfInfo, Library, SearchContext, parse_ld_so_conf, search_library
from sconify.analyze.files import (
    FileContent,
    HeaderCache,
    LayerCounts,
    LayerHeaders,
    LayerReader,
    ReadFingerprint,
    ReadStats,
)
from sconify.analyze.findings import Finding
from sconify.analyze.interpreters import SYSTEM_DIRS, Interpreter, app_root, describe_interpreter
from sconify.analyze.view import ImageView, absolute
from sconify.errors import ConversionError, SconifyError, UnsupportedError
from sconify.image.model import Image
from sconify.image.tarfs.entry import EntryKind
from sconify.image.tree import FileTree
from sconify.progress import SILENT, Progress
from sconify.rules import RuleFacts, RuleSet, apply_rules, load_rules
from sconify.rules.apply import ProposedRegion, region_sort_key

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_ROUNDS = 8  # content fetch rounds after the header pass; each reads a layer at most once
INTERPRETED = ("python", "node", "java", "ruby", "perl", "php", "shell")
_SECRET_NAME_RE = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE|_PASS$|^PASS$",
                             re.IGNORECASE)
# Names that contain KEY but hold public material in many official images (key fingerprints, key servers).
_PUBLIC_KEY_NAMES_RE = re.compile(r"^(GPG_KEYS?|[A-Z0-9_]*_GPG_KEYS?|KEYSERVER|[A-Z0-9_]*_PUBKEYS?)$")
SETUID_LISTED = 20


@dataclass(frozen=True)
class ElfFacts:
    """ELF facts of one program the command executes, with its libraries resolved in the image."""

    path: str
    elf_class: int
    machine: str
    type: str
    static: bool
    pie: bool
    interpreter: str | None
    libc: str
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    libraries: tuple[Library, ...]  # every library loaded at start (transitively), in load order
    missing: tuple[Library, ...]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "class": self.elf_class,
            "machine": self.machine,
            "type": self.type,
            "static": self.static,
            "pie": self.pie,
            "interpreter": self.interpreter,
            "libc": self.libc,
            "needed": list(self.needed),
            "rpath": list(self.rpath),
            "runpath": list(self.runpath),
            "libraries": [lib.to_json() for lib in self.libraries],
            "missing": [lib.to_json() for lib in self.missing],
            "error": self.error,
        }


@dataclass(frozen=True)
class EnclaveProposal:
    """Enclave settings proposed for the program, with the rule that chose each."""

    heap: int
    stack: int
    threads: int
    dlopen: str  # disabled | authenticated | unrestricted
    rules: tuple[tuple[str, str], ...] = ()  # (setting, rule name)

    def to_json(self) -> dict[str, Any]:
        return {"heap": self.heap, "stack": self.stack, "threads": self.threads, "dlopen": self.dlopen,
                "rules": dict(self.rules)}


@dataclass(frozen=True)
class LayerSummary:
    """One layer: its blob, what its tar holds, and what of it is visible in the merged tree."""

    index: int
    digest: str
    media_type: str
    size: int
    entries: int
    whiteouts: int
    regular_bytes: int
    visible_entries: int
    visible_bytes: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TreeSummary:
    """The merged file tree in numbers."""

    entries: int  # every path but the root
    files: int  # regular files and hard links
    directories: int
    symlinks: int
    other: int  # devices, fifos
    bytes: int  # sum of regular file sizes
    setuid: tuple[str, ...]  # files with the setuid or setgid bit (first SETUID_LISTED)
    setuid_count: int
    layers: tuple[LayerSummary, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "files": self.files,
            "directories": self.directories,
            "symlinks": self.symlinks,
            "other": self.other,
            "bytes": self.bytes,
            "setuid": list(self.setuid),
            "setuid_count": self.setuid_count,
            "layers": [layer.to_json() for layer in self.layers],
        }


@dataclass(frozen=True)
class ReadSummary:
    """What the analysis read: bytes and how often each layer was streamed."""

    layer_reads: tuple[int, ...]
    rounds: int
    compressed_bytes: int
    uncompressed_bytes: int
    header_pass_compressed_bytes: int
    header_pass_uncompressed_bytes: int
    content_bytes: int
    files_fetched: int

    @classmethod
    def of(cls, stats: ReadStats) -> ReadSummary:
        return cls(tuple(stats.layer_reads), stats.rounds, stats.compressed_bytes, stats.uncompressed_bytes,
                   stats.header_pass_compressed, stats.header_pass_uncompressed, stats.content_bytes,
                   stats.files_fetched)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["layer_reads"] = list(self.layer_reads)
        return out


@dataclass(frozen=True)
class Analysis:
    """Everything sconify learned about an image before converting it. Plain data; see ``to_json``."""

    source: str
    digest: str
    platform: str
    command: Command
    executable: str | None
    final_argv: tuple[str, ...]  # the argv the executable gets (after shebangs, env and wrappers)
    chain: tuple[Step, ...]
    programs: tuple[ElfFacts, ...]
    elf: ElfFacts | None
    user: User
    workdir: str
    env: tuple[str, ...]
    interpreter: Interpreter | None
    libraries: tuple[Library, ...]
    scripts: tuple[str, ...]
    regions: tuple[ProposedRegion, ...]
    enclave: EnclaveProposal
    environment: tuple[tuple[str, str, str], ...]  # (name, value, rule) the rules add to the policy's env
    notes: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    problems: tuple[Finding, ...]
    rules_matched: tuple[str, ...]
    rules_replaced: tuple[tuple[str, str, str], ...]
    tree: TreeSummary
    reads: ReadSummary
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    volumes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    @property
    def argv(self) -> tuple[str, ...]:
        """The exact argv Docker would exec: Entrypoint followed by Cmd."""
        return self.command.argv

    @property
    def convertible(self) -> bool:
        return not self.problems

    def error(self) -> SconifyError | None:
        """The error a conversion of this image would stop with (None when it is convertible).

        An unsupported architecture is an UnsupportedError (exit 9), every other problem a ConversionError (11).
        """
        if not self.problems:
            return None
        first = self.problems[0]
        more = f" ({len(self.problems) - 1} more problem{'s' if len(self.problems) > 2 else ''} in the report)" \
            if len(self.problems) > 1 else ""
        text = f"{self.source} cannot be converted: {first.message.rstrip('.')}{more}."
        if any(p.code == fc.UNSUPPORTED_ARCHITECTURE for p in self.problems):
            arch = next(p for p in self.problems if p.code == fc.UNSUPPORTED_ARCHITECTURE)
            return UnsupportedError(f"{self.source} cannot be converted: {arch.message.rstrip('.')}{more}.")
        return ConversionError(text)

    def mode_of(self, path: str) -> ProposedRegion | None:
        """The region that decides ``path`` (longest prefix wins), or None."""
        return region_for(self.regions, path)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "digest": self.digest,
            "platform": self.platform,
            "convertible": self.convertible,
            "problems": [p.to_json() for p in self.problems],
            "warnings": [w.to_json() for w in self.warnings],
            "notes": [n.to_json() for n in self.notes],
            "command": {
                "entrypoint": list(self.command.entrypoint) if self.command.entrypoint is not None else None,
                "cmd": list(self.command.cmd) if self.command.cmd is not None else None,
                "shell_form": self.command.shell_form,
            },
            "argv": list(self.argv),
            "executable": self.executable,
            "final_argv": list(self.final_argv),
            "chain": [s.to_json() for s in self.chain],
            "programs": [p.to_json() for p in self.programs],
            "elf": self.elf.to_json() if self.elf else None,
            "user": self.user.to_json(),
            "workdir": self.workdir,
            "env": list(self.env),
            "labels": dict(self.labels),
            "volumes": list(self.volumes),
            "interpreter": self.interpreter.to_json() if self.interpreter else None,
            "libraries": [lib.to_json() for lib in self.libraries],
            "scripts": list(self.scripts),
            "regions": [r.to_json() for r in self.regions],
            "enclave": self.enclave.to_json(),
            "environment": [{"name": n, "value": v, "rule": r} for n, v, r in self.environment],
            "rules": {
                "matched": list(self.rules_matched),
                "replaced": [{"name": n, "shipped": a, "by": b} for n, a, b in self.rules_replaced],
            },
            "tree": self.tree.to_json(),
            "reads": self.reads.to_json(),
        }


def region_for(regions: Sequence[ProposedRegion], path: str) -> ProposedRegion | None:
    """The region with the longest path prefix of ``path`` (component-wise), as the file system shield chooses."""
    best: ProposedRegion | None = None
    for region in regions:
        top = region.path.rstrip("/")
        if region.path == "/" or path == top or path.startswith(top + "/"):
            if best is None or len(region_sort_key(region.path)) > len(region_sort_key(best.path)):
                best = region
    return best


# ------------------------------------------------------------------------------------------------ reading


def summarize_tree(tree: FileTree, image: Image, counts: Sequence[LayerCounts]) -> TreeSummary:
    """Count the merged tree once (entries, kinds, bytes, setuid files, what each layer still shows)."""
    files = dirs = links = other = total = 0
    setuid: list[str] = []
    setuid_count = 0
    visible = [0] * len(counts)
    visible_bytes = [0] * len(counts)
    for node in tree.walk():
        if node.path == "":
            continue
        kind = node.kind
        if 0 <= node.layer < len(visible) and not node.implicit:
            visible[node.layer] += 1
        if kind is EntryKind.REGULAR:
            files += 1
            total += node.entry.size
            if 0 <= node.layer < len(visible):
                visible_bytes[node.layer] += node.entry.size
        elif kind is EntryKind.HARDLINK:
            files += 1
        elif kind is EntryKind.DIRECTORY:
            dirs += 1
        elif kind is EntryKind.SYMLINK:
            links += 1
        else:
            other += 1
        if kind in (EntryKind.REGULAR, EntryKind.HARDLINK) and node.entry.mode & 0o6000:
            setuid_count += 1
            if len(setuid) < SETUID_LISTED:
                setuid.append(absolute(node.path))
    layers = tuple(
        LayerSummary(i, layer.descriptor.digest, layer.descriptor.media_type, layer.descriptor.size, c.entries,
                     c.whiteouts, c.regular_bytes, visible[i], visible_bytes[i])
        for i, (layer, c) in enumerate(zip(image.layers, counts, strict=True))
    )
    return TreeSummary(len(tree) - 1, files, dirs, links, other, total, tuple(setuid), setuid_count, layers)


def analyze(
    image: Image,
    rules: RuleSet | None = None,
    *,
    source: str | None = None,
    progress: Progress = SILENT,
    cache: HeaderCache | None = None,
) -> Analysis:
    """Analyze an image without running it: read the layer headers once, then the few files needed, in rounds."""
    return analyze_image(image, rules, source=source, progress=progress, cache=cache).analysis


@dataclass(frozen=True)
class AnalyzedImage:
    """An analysis with the header scan it was made from (the converter plans its layers from the same scan)."""

    analysis: Analysis
    tree: FileTree
    headers: tuple[LayerHeaders, ...]
    # Layers read without verification (only with ``defer_verification``), with what each read saw: the caller
    # verifies every one in full and checks the fingerprints against the verified bytes.
    unverified: Mapping[int, tuple[ReadFingerprint, ...]] = field(default_factory=dict)


def analyze_image(
    image: Image,
    rules: RuleSet | None = None,
    *,
    source: str | None = None,
    progress: Progress = SILENT,
    cache: HeaderCache | None = None,
    defer_verification: bool = False,
) -> AnalyzedImage:
    """``analyze``, also returning the merged tree and each layer's headers.

    With ``defer_verification``, uncompressed local layers are read in place without verifying them; the
    result's ``unverified`` names them and the caller must read each in full, verified, before it writes
    anything that depends on the analysis (the converter does).
    """
    ruleset = rules if rules is not None else load_rules()
    reader = LayerReader(image, progress=progress, cache=cache, defer_verification=defer_verification)
    tree, captured, counts = reader.header_pass()
    summary = summarize_tree(tree, image, counts)
    contents: dict[tuple[int, str], FileContent] = dict(captured)
    unreadable = FileContent(size=-1, head=b"")
    for round_no in range(MAX_ROUNDS + 1):
        view = ImageView(tree, contents)
        derived = _derive(image, view, ruleset, summary, source or image.name)
        if not view.wants:
            break
        if round_no == MAX_ROUNDS:
            log.warning("analysis stopped after %d rounds with %d files unread", MAX_ROUNDS, len(view.wants))
            break
        reader.stats.rounds += 1
        log.info("analysis round %d: reading %d files", reader.stats.rounds, len(view.wants))
        fetched = reader.fetch(sorted(view.wants))
        for key in view.wants:
            contents[key] = fetched.get(key, unreadable)
    incomplete = bool(view.wants)
    warnings = derived["warnings"]
    if incomplete:
        warnings = (*warnings, Finding("analysis-incomplete", f"sconify stopped after {MAX_ROUNDS} read rounds "
                                       f"with {len(view.wants)} files unread; the analysis may miss libraries."))
    analysis = Analysis(**{**derived, "warnings": warnings}, tree=summary, reads=ReadSummary.of(reader.stats))
    unverified = {i: tuple(reader.fingerprints.get(i, ())) for i in sorted(reader.unverified)}
    return AnalyzedImage(analysis, tree, tuple(reader.headers), unverified)


# ------------------------------------------------------------------------------------------------ deriving


def _elf_problems(path: str, info: ElfInfo, final: bool) -> list[Finding]:
    out = []
    if info.error and final:
        out.append(Finding(fc.BAD_ELF, f"the program {path} starts like an ELF file but cannot be read "
                           f"({info.error}); the image is damaged or the file is not a program.", path))
    if not info.is_x86_64:
        out.append(Finding(fc.UNSUPPORTED_ARCHITECTURE,
                           f"the program {path} is a {info.elf_class}-bit {info.machine} ELF; SGX enclaves run only "
                           "x86-64 code, so use the image's linux/amd64 variant", path))
    return out


def _search_context(info: ElfInfo, env: Mapping[str, str], workdir: str, view: ImageView) -> SearchContext:
    musl = "ld-musl" in (info.interpreter or "") or any(n.startswith("libc.musl") for n in info.needed)
    ld_path = tuple(p for p in (env.get("LD_LIBRARY_PATH") or "").split(":") if p)
    if musl:
        conf: tuple[str, ...] = ()
        for path in view.glob("/etc/ld-musl-*.path"):
            text = view.text(path)
            if text:
                conf = tuple(d for d in re.split(r"[:\n]", text) if d.strip().startswith("/"))
                break
        return SearchContext("musl", ld_path, tuple(d.strip() for d in conf), workdir)

    def read(path: str) -> str | None:
        return view.text(path) if view.is_file(path) else None

    dirs, _ = parse_ld_so_conf(read, view.glob)
    return SearchContext("glibc", ld_path, tuple(dirs), workdir)


def _resolve_libraries(path: str, info: ElfInfo, env: Mapping[str, str], workdir: str, view: ImageView,
                       warnings: list[Finding]) -> tuple[list[Library], list[Library]]:
    """Every library the loader maps for ``path`` at start (breadth first, each soname once) and the missing."""
    found: list[Library] = []
    missing: list[Library] = []
    if info.interpreter:
        real = view.resolve(info.interpreter) if info.interpreter.startswith("/") else None
        if real and view.is_file(real):
            found.append(Library(info.interpreter, path, info.interpreter, "PT_INTERP"))
        else:
            missing.append(Library(info.interpreter, path, None, "PT_INTERP"))
    ctx = _search_context(info, env, workdir, view)
    loaded: set[str] = set()
    queue: list[tuple[str, ElfInfo, list[tuple[str, tuple[str, ...]]]]] = [(path, info, [])]
    seen = {path}
    if info.interpreter and found:
        # The loader is in the link map under its own name: a DT_NEEDED of it is satisfied without a search.
        loaded.add(posixpath.basename(info.interpreter))
        seen.add(view.resolve(info.interpreter) or info.interpreter)
    while queue:
        obj_path, obj, loaders = queue.pop(0)
        for name in obj.needed:
            if name in loaded:
                continue
            loaded.add(name)
            lib_path, via = search_library(name, obj_path, obj, loaders, ctx, view.is_file)
            if lib_path is None:
                missing.append(Library(name, obj_path, None, ""))
                continue
            found.append(Library(name, obj_path, lib_path, via))
            real = view.resolve(lib_path) or lib_path
            if real in seen:
                continue
            seen.add(real)
            lib = view.elf(real)
            if lib is None:
                continue
            if lib.error or lib.machine != info.machine or lib.elf_class != info.elf_class:
                warnings.append(Finding("library-mismatch", f"the library {lib_path} needed by {obj_path} is "
                                        f"{'unreadable' if lib.error else f'a {lib.elf_class}-bit {lib.machine} ELF'}; "
                                        "the loader would skip it.", lib_path))
                continue
            loader_chain = [*loaders, (obj_path, obj.rpath)] if not obj.runpath else list(loaders)
            queue.append((lib_path, lib, loader_chain))
    return found, missing


def _libc(info: ElfInfo, libs: Sequence[Library]) -> str:
    own = info.libc()
    if own != "unknown":
        return own
    names = {lib.name for lib in libs}
    if "libc.so.6" in names:
        return "glibc"
    if any(n.startswith("libc.musl") or "ld-musl" in n for n in names):
        return "musl"
    return own


def _secret_names(env: Mapping[str, str]) -> list[str]:
    return [name for name in env if _SECRET_NAME_RE.search(name) and not _PUBLIC_KEY_NAMES_RE.match(name)]


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


def _derive(image: Image, view: ImageView, ruleset: RuleSet, summary: TreeSummary, source: str) -> dict[str, Any]:
    """Everything of the Analysis but the tree summary and read counts, from what the view knows now."""
    cfg = image.config.get("config") or {}
    if not isinstance(cfg, dict):
        cfg = {}
    problems: list[Finding] = []
    warnings: list[Finding] = []
    notes: list[Finding] = []

    platform = image.platform
    if platform.architecture and platform.architecture != "amd64":
        problems.append(Finding(fc.UNSUPPORTED_ARCHITECTURE,
                                f"the image is built for {platform}; SGX enclaves run only x86-64 (linux/amd64) code, "
                                "so convert the image's linux/amd64 variant"))
    command = compose_command(cfg)
    env_list = tuple(str(e) for e in cfg.get("Env") or ())
    env = parse_env(env_list)
    workdir, workdir_ok = working_dir(cfg)
    if not workdir_ok:
        warnings.append(Finding("relative-workdir", f"the image's WorkingDir {cfg.get('WorkingDir')!r} is relative; "
                                f"Docker refuses that, sconify reads it as {workdir}.", workdir))
    path_dirs = search_path(env)
    labels = {str(k): str(v) for k, v in (cfg.get("Labels") or {}).items()}
    volumes = tuple(sorted(str(v) for v in (cfg.get("Volumes") or {})))

    passwd = view.text("/etc/passwd") if view.is_file("/etc/passwd") else None
    group = view.text("/etc/group") if view.is_file("/etc/group") else None
    user = resolve_user(cfg.get("User"), passwd, group)
    if user.problem:
        problems.append(Finding(fc.UNKNOWN_USER, user.problem, "/etc/passwd"))

    if command.empty:
        problems.append(Finding(fc.NO_COMMAND, "the image has neither an Entrypoint nor a Cmd, so there is no program "
                                "to run in an enclave; rebuild it with an ENTRYPOINT or CMD"))
        chain = Chain((), (), (), (), None, None, (), None)
    else:
        chain = follow_command(command.argv, env, path_dirs, workdir, view)
    problems += chain.problems
    warnings += chain.warnings
    notes += chain.notes

    # ELF facts and libraries of every program the command executes.
    programs: list[ElfFacts] = []
    for prog in dict.fromkeys(chain.programs):
        info = view.elf(prog)
        if info is None:
            continue
        final = prog == chain.executable
        problems += _elf_problems(prog, info, final or prog == chain.programs[0])
        libs: list[Library] = []
        missing: list[Library] = []
        if not info.error and info.is_x86_64:
            libs, missing = _resolve_libraries(prog, info, env, workdir, view, warnings)
        for lib in missing:
            if lib.via == "PT_INTERP":
                problems.append(Finding(fc.MISSING_LOADER, f"the program {prog} needs the dynamic loader {lib.name}, "
                                        "which is not in the image, so it cannot start", prog))
            else:
                problems.append(Finding(fc.MISSING_LIBRARY, f"the library {lib.name} needed by {lib.needed_by} is not "
                                        "in the image (searched RPATH/RUNPATH, LD_LIBRARY_PATH, ld.so.conf and the "
                                        "default directories), so the program cannot start", lib.needed_by))
        programs.append(ElfFacts(
            path=prog, elf_class=info.elf_class, machine=info.machine, type=info.type, static=info.static,
            pie=info.pie, interpreter=info.interpreter, libc=_libc(info, libs), needed=info.needed,
            rpath=info.rpath, runpath=info.runpath, libraries=tuple(libs), missing=tuple(missing), error=info.error,
        ))
        if info.type == "exec":
            warnings.append(Finding("not-pie", f"the program {prog} is not position independent (ET_EXEC); SCONE "
                                    "needs PIE programs, so it must be rebuilt with -fPIE -pie or replaced by a "
                                    "SCONE-provided build", prog))
    elf = next((p for p in programs if p.path == chain.executable), None)
    libraries: dict[str, Library] = {}
    for prog_facts in programs:
        for lib in prog_facts.libraries:
            if lib.path is not None and lib.path not in libraries:
                libraries[lib.path] = lib

    interpreter: Interpreter | None = None
    if chain.executable and chain.kind in INTERPRETED:
        interpreter = describe_interpreter(chain.kind, chain.invoked or chain.executable, chain.executable,
                                           chain.final_argv[1:], env, workdir, user.home, view, volumes)
        if interpreter.script and not view.exists(interpreter.script):
            warnings.append(Finding("missing-script", f"the {interpreter.kind} script {interpreter.script} does not "
                                    "exist in the image; the program will fail unless a volume provides it.",
                                    interpreter.script))

    scripts = list(chain.scripts)
    if interpreter and interpreter.script and view.is_file(interpreter.script):
        real = view.resolve(interpreter.script) or interpreter.script
        if real not in scripts:
            scripts.append(real)

    # Variables for the rules' region paths.
    app: list[str] = []

    def add_app(path: str | None) -> None:
        if path and path not in app and not any(_under(path, v) for v in volumes):
            app.append(path)

    if chain.executable and interpreter is None:
        root = app_root(chain.executable, False)
        if root != chain.executable:
            add_app(root)
    for script in scripts:
        add_app(app_root(script, False))
    if interpreter:
        for tree in interpreter.code_trees:
            if tree.role == "application":
                add_app(tree.path)
    if workdir not in SYSTEM_DIRS:
        add_app(app_root(workdir, True))
    library_paths: list[str] = []
    for lib in libraries.values():
        for candidate in (lib.path, view.resolve(lib.path) if lib.path else None):
            if candidate and candidate not in library_paths:
                library_paths.append(candidate)
    variables: dict[str, tuple[str, ...]] = {
        "workdir": (workdir,) if workdir != "/" else (),
        "home": (user.home,) if user.home and user.home != "/" else (),
        "executable": (chain.executable,) if chain.executable else (),
        "executable_dir": (posixpath.dirname(chain.executable),) if chain.executable else (),
        "interpreter": (interpreter.binary,) if interpreter else (),
        "script": (interpreter.script,) if interpreter and interpreter.script and view.exists(interpreter.script)
        else (),
        "scripts": tuple(scripts),
        "app": tuple(app),
        "programs": tuple(dict.fromkeys(chain.programs)),
        "libraries": tuple(library_paths),
        "volumes": volumes,
    }
    if interpreter:
        for tree in interpreter.code_trees:
            key = "code." + tree.role
            variables[key] = (*variables.get(key, ()), tree.path)

    executables: list[str] = []
    for step in chain.steps:
        if step.kind in ("command", "path-lookup", "symlink", "program"):
            executables.append(step.path)
        if step.kind == "symlink":
            executables.append(step.detail.removeprefix("-> "))
    facts = RuleFacts(
        executables=tuple(dict.fromkeys(executables)),
        interpreter=interpreter.kind if interpreter else "none",
        argv=command.argv,
        labels=labels,
        env_names=tuple(env),
        elf={"static": elf.static, "pie": elf.pie, "libc": elf.libc} if elf else {},
        variables=variables,
        exists=view.exists,
        listdir=view.listdir,
    )
    applied = apply_rules(ruleset, facts)
    regions = applied.regions
    for rule_name, note in applied.notes:
        notes.append(Finding("rule-note", note, None, rule_name))
    enclave = EnclaveProposal(
        heap=int(applied.enclave.get("heap", (64 << 20, ""))[0]),
        stack=int(applied.enclave.get("stack", (1 << 20, ""))[0]),
        threads=int(applied.enclave.get("threads", (4, ""))[0]),
        dlopen=str(applied.enclave.get("dlopen", ("disabled", ""))[0]),
        rules=tuple((k, v[1]) for k, v in sorted(applied.enclave.items())),
    )

    # Warnings that matter to a confidential deployment.
    code_paths: list[tuple[str, str]] = [(s, "script") for s in scripts]
    if interpreter:
        code_paths += [(t.path, f"{interpreter.kind} {t.role}") for t in interpreter.code_trees
                       if t.role not in ("config",)]
    for path, what in code_paths:
        region = region_for(regions, path)
        if region is None or region.mode == "not-protected":
            warnings.append(Finding("code-not-protected", f"the {what} {path} is interpreted code but would be in "
                                    f"no protected region ({region.path if region else 'no region'} is "
                                    "not-protected); an attacker could change it unnoticed. Protect it with a rule.",
                                    path))
    for path in [*chain.programs, *library_paths]:
        region = region_for(regions, path)
        if region is not None and region.mode == "encrypted":
            warnings.append(Finding("program-encrypted", f"{path} is loaded into the enclave before attestation "
                                    f"but would be in the encrypted region {region.path} (rule {region.rule}); "
                                    "make it authenticated.", path))
    for name in _secret_names(env):
        warnings.append(Finding("secret-in-env", f"the image's environment sets {name}, which looks like a secret; "
                                "anyone who can pull the image can read it. Move it into the policy's secrets.",
                                None))
    for path in summary.setuid:
        warnings.append(Finding("setuid", f"{path} has the setuid or setgid bit; inside an enclave it cannot gain "
                                "privileges, and it widens what a compromised container can do.", path))
    if summary.setuid_count > len(summary.setuid):
        warnings.append(Finding("setuid", f"{summary.setuid_count - len(summary.setuid)} more setuid or setgid files "
                                "are not listed."))
    if chain.executable and elf is None and not view.wants:
        warnings.append(Finding("elf-unread", f"the ELF facts of {chain.executable} could not be read."))
    if not user.problem and user.uid == 0:
        notes.append(Finding("root-user", "the image runs as root (uid 0); consider a non-root USER."))
    env_out = tuple((name, value, rule) for name, (value, rule) in sorted(applied.env.items()))

    return {
        "source": source,
        "digest": image.digest,
        "platform": str(platform),
        "command": command,
        "executable": chain.executable,
        "final_argv": chain.final_argv if chain.executable else (),
        "chain": chain.steps,
        "programs": tuple(programs),
        "elf": elf,
        "user": user,
        "workdir": workdir,
        "env": env_list,
        "interpreter": interpreter,
        "libraries": tuple(libraries.values()),
        "scripts": tuple(scripts),
        "regions": regions,
        "enclave": enclave,
        "environment": env_out,
        "notes": tuple(notes),
        "warnings": tuple(_dedup(warnings)),
        "problems": tuple(_dedup(problems)),
        "rules_matched": applied.matched,
        "rules_replaced": ruleset.replaced,
        "labels": labels,
        "volumes": volumes,
    }


def _dedup(items: Sequence[Finding]) -> list[Finding]:
    out: list[Finding] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out
