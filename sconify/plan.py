"""The conversion plan: plain data saying what a conversion will do (regions, enclave settings, the policy's
service, the new config, which layers change and why). Pure functions only: no I/O.

``make_plan`` joins an ``Analysis``, the per-layer facts of a header scan and the user's options; the result
can be printed (``--dry-run``), diffed, and executed by ``sconify.convert``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sconify.enclave.settings import DlopenMode, EnclaveSettings, parse_size
from sconify.errors import ConversionError, UsageError
from sconify.policy.secrets import ServiceSecrets

RUNTIME_PATH = "/.sconify/bin/sconify-run"
METADATA_PATH = "/.sconify/fspf/volume.fspf"
RUNTIME_DIR = "/.sconify"
MODES = ("encrypted", "authenticated", "not-protected")
DEFAULT_CAS = "cas.scone:8081"
DEFAULT_LAS = "las.scone:18766"
# The analyzer's names for dlopen proposals, mapped onto the enclave's settings.
_DLOPEN_FROM_ANALYSIS = {"disabled": "off", "authenticated": "protected", "unrestricted": "unprotected"}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables the runtime owns; a user may not move them into the policy or override them.
RESERVED_ENV = (
    "SCONE_CONFIG_ID",
    "SCONE_CAS_ADDR",
    "SCONE_LAS_ADDR",
    "SCONE_MODE",
    "SCONE_HEAP",
    "SCONE_STACK",
    "SCONE_THREADS",
    "SCONE_ALLOW_DLOPEN",
    "SCONE_DEBUG",
    "SCONIFY_EXECUTABLE",
    "SCONIFY_USER",
    "SCONIFY_SESSION_FILE",
)


@dataclass(frozen=True)
class ConvertOptions:
    """What the user asked for beyond the defaults (everything here is plain data, reproducible)."""

    encrypt: tuple[str, ...] = ()
    authenticate: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()
    heap: str | None = None
    stack: str | None = None
    threads: int | None = None
    dlopen: str | None = None
    allow_debug: bool = False
    env: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] | None = None
    session: str | None = None
    namespace: str | None = None
    service: str | None = None
    cas: str = DEFAULT_CAS
    las: str = DEFAULT_LAS
    runtime: str | None = None
    chunk_size: int = 65536
    # How rewritten layers are written: "auto" (uncompressed when mostly ciphertext, else gzip), "gzip", "none".
    layer_compression: str = "auto"
    created: str | None = None  # RFC 3339 time for new layers and the config (default: the source's)
    # Secrets, TLS files and encrypted volumes the session declares (--secret, --tls-*, --volume).
    service_secrets: ServiceSecrets = field(default_factory=ServiceSecrets)


@dataclass(frozen=True)
class Region:
    """A path prefix and how its files are kept at rest, with why."""

    path: str
    mode: str
    reason: str
    source: str  # the rule or option that chose it

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "mode": self.mode, "reason": self.reason, "source": self.source}


@dataclass(frozen=True)
class LayerFacts:
    """What a header scan learned about one source layer (no contents)."""

    index: int
    digest: str
    diff_id: str
    size: int
    entries: int
    # Paths of regular files and hard links, with their size, and whether the merged tree shows them.
    files: tuple[tuple[str, int, bool], ...]


@dataclass(frozen=True)
class LayerAction:
    """What happens to one source layer: ``reuse`` (byte for byte) or ``rewrite`` (and why)."""

    index: int
    digest: str
    action: str
    reason: str
    encrypted_files: int = 0
    encrypted_bytes: int = 0
    dropped_files: int = 0  # hidden copies of encrypted files, removed

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RegionStats:
    mode: str
    files: int
    bytes: int


@dataclass(frozen=True)
class Plan:
    """Everything a conversion will do, decided before any byte is written."""

    source: str
    source_digest: str
    platform: str
    session: str
    service: str
    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    pwd: str
    user: str  # uid:gid the program runs as
    executable: str | None  # the ELF measured into the enclave, absolute in the image
    regions: tuple[Region, ...]
    settings: EnclaveSettings
    layers: tuple[LayerAction, ...]
    image_env: tuple[tuple[str, str], ...]
    cas: str
    las: str
    relaxations: tuple[str, ...]
    region_stats: tuple[RegionStats, ...]
    warnings: tuple[str, ...] = ()
    runtime_path: str = RUNTIME_PATH
    metadata_path: str = METADATA_PATH
    chunk_size: int = 65536
    runtime: str | None = None
    created: str | None = None
    moved_secrets: tuple[str, ...] = field(default=())  # names of Env entries that looked like secrets

    @property
    def config_id(self) -> str:
        return f"{self.session}/{self.service}"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_digest": self.source_digest,
            "platform": self.platform,
            "session": self.session,
            "service": self.service,
            "config_id": self.config_id,
            "command": list(self.argv),
            "environment": {k: ("<moved to policy>" if k in self.moved_secrets else v) for k, v in self.environment},
            "pwd": self.pwd,
            "user": self.user,
            "executable": self.executable,
            "runtime": self.runtime or "builtin",
            "regions": [r.to_json() for r in self.regions],
            "region_stats": [s.__dict__ for s in self.region_stats],
            "enclave": self.settings.to_dict(),
            "layers": [a.to_json() for a in self.layers],
            "image_env": dict(self.image_env),
            "cas": self.cas,
            "las": self.las,
            "relaxations": list(self.relaxations),
            "warnings": list(self.warnings),
        }


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def options_from_flags(values: Mapping[str, Any]) -> ConvertOptions:
    """``ConvertOptions`` from ``sconify convert``'s flag names (``--allow-debug`` as ``allow_debug``), as the
    command line, batch job files and service routes give them; the one mapping from flags to options.

    ``session`` names the CAS session (the CLI's ``--name``). ``command`` is a list of arguments, or one string
    split like a shell would (no expansion). ``env`` is a list of ``NAME=VALUE`` or a mapping.
    """
    import shlex

    command = values.get("command")
    if isinstance(command, str):
        command = tuple(shlex.split(command))
    elif command:
        command = tuple(str(c) for c in command)
        if len(command) == 1:
            command = tuple(shlex.split(command[0]))
    else:
        command = None
    env = values.get("env") or ()
    if isinstance(env, Mapping):
        env_pairs = tuple((str(k), str(v)) for k, v in env.items())
    else:
        env_pairs = parse_env_option([str(e) for e in env])
    secret_flags = {k: _strings(values.get(k)) for k in ("tls_server", "tls_client", "tls_ca", "volume", "secret")}
    extra: dict[str, Any] = {}
    if any(secret_flags.values()):
        from sconify.policy.secrets import parse_service_secrets

        extra["service_secrets"] = parse_service_secrets(
            tls_server=secret_flags["tls_server"], tls_client=secret_flags["tls_client"],
            tls_ca=secret_flags["tls_ca"], volumes=secret_flags["volume"], secrets=secret_flags["secret"],
        )

    def size(name: str) -> str | None:
        value = values.get(name)
        return None if value is None else str(value)

    threads = values.get("threads")
    return ConvertOptions(
        encrypt=_strings(values.get("encrypt")),
        authenticate=_strings(values.get("authenticate")),
        plain=_strings(values.get("plain")),
        heap=size("heap"),
        stack=size("stack"),
        threads=None if threads is None else int(threads),
        dlopen=values.get("dlopen"),
        allow_debug=bool(values.get("allow_debug", False)),
        env=env_pairs,
        command=command,
        session=values.get("session"),
        namespace=values.get("namespace"),
        service=values.get("service"),
        cas=values.get("cas") or DEFAULT_CAS,
        las=values.get("las") or DEFAULT_LAS,
        runtime=values.get("runtime"),
        chunk_size=int(values.get("chunk_size") or ConvertOptions.chunk_size),
        layer_compression=_layer_compression(values.get("layer_compression")),
        **extra,
    )


LAYER_COMPRESSIONS = ("auto", "gzip", "none")


def _layer_compression(value: Any) -> str:
    if value is None:
        return "auto"
    if value not in LAYER_COMPRESSIONS:
        raise UsageError(f"the layer compression {value!r} is not one of {', '.join(LAYER_COMPRESSIONS)}; pick one.")
    return str(value)


def normalize_region_path(path: str) -> str:
    """An absolute, normalised region prefix (``/app``; the root is ``/``)."""
    if not path or "\0" in path:
        raise UsageError(f"region path {path!r} is empty or malformed; give an absolute path such as /app.")
    if not path.startswith("/"):
        raise UsageError(f"region path {path!r} is not absolute; give it as /{path}.")
    norm = posixpath.normpath(path)
    norm = "/" + norm.lstrip("/")
    if ".." in norm.split("/"):
        raise UsageError(f"region path {path!r} leaves the root; give an absolute path inside the image.")
    return norm


def region_for(regions: Sequence[Region], path: str) -> Region:
    """The region deciding an absolute path: the longest prefix, component-wise."""
    best: Region | None = None
    for region in regions:
        top = region.path.rstrip("/")
        if region.path == "/" or path == top or path.startswith(top + "/"):
            if best is None or region.path.count("/") + (region.path != "/") > best.path.count("/") + (
                best.path != "/"
            ):
                best = region
    assert best is not None, "a root region is always present"
    return best


def _regions(analysis_regions: Sequence[Any], options: ConvertOptions) -> tuple[Region, ...]:
    chosen: dict[str, Region] = {}
    for proposal in analysis_regions:
        path = normalize_region_path(proposal.path)
        chosen[path] = Region(path, proposal.mode, proposal.reason, f"rule {proposal.rule}")
    for mode, paths in (
        ("encrypted", options.encrypt),
        ("authenticated", options.authenticate),
        ("not-protected", options.plain),
    ):
        for raw in paths:
            path = normalize_region_path(raw)
            chosen[path] = Region(path, mode, f"asked for with --{_OPTION[mode]}", f"option --{_OPTION[mode]}")
    chosen.setdefault("/", Region("/", "authenticated", "everything not said otherwise keeps its integrity", "default"))
    # The runtime's own files are added after the volume is sealed; they are measured, not shielded.
    chosen[RUNTIME_DIR] = Region(
        RUNTIME_DIR, "not-protected", "the runtime and the volume metadata live here", "sconify"
    )
    return tuple(sorted(chosen.values(), key=lambda r: r.path))


_OPTION = {"encrypted": "encrypt", "authenticated": "authenticate", "not-protected": "plain"}


def _settings(analysis: Any, options: ConvertOptions) -> EnclaveSettings:
    proposal = analysis.enclave
    dlopen = options.dlopen or _DLOPEN_FROM_ANALYSIS.get(proposal.dlopen, proposal.dlopen)
    return EnclaveSettings.from_options(
        heap=options.heap if options.heap is not None else proposal.heap,
        stack=options.stack if options.stack is not None else proposal.stack,
        threads=options.threads if options.threads is not None else proposal.threads,
        dlopen=DlopenMode.parse(dlopen),
        debug=options.allow_debug,
    )


def _check_env(pairs: Sequence[tuple[str, str]]) -> None:
    for name, _ in pairs:
        if not _ENV_NAME_RE.match(name):
            raise UsageError(f"--env {name!r} is not a valid variable name; use NAME=VALUE.")
        if name in RESERVED_ENV:
            raise UsageError(f"--env {name} is set by sconify itself; use the matching option instead.")


class _ModeLookup:
    """``region_for(regions, path).mode`` for many paths: a dictionary walk up the path, with each directory's
    answer kept (the files of one directory share it)."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self._exact = {r.path: r.mode for r in regions}
        self._dirs: dict[str, str] = {}

    def _dir(self, path: str) -> str:
        unknown = []
        mode = self._exact.get(path) or self._dirs.get(path)
        while mode is None:
            unknown.append(path)
            path = posixpath.dirname(path)
            mode = self._exact.get(path) or self._dirs.get(path)
            if mode is None and path == "/":
                raise AssertionError("a root region is always present")
        for path in unknown:
            self._dirs[path] = mode
        return mode

    def __call__(self, path: str) -> str:
        """The mode of the region deciding the absolute ``path``."""
        return self._exact.get(path) or self._dir(posixpath.dirname(path))


def _layer_actions(layers: Sequence[LayerFacts], regions: Sequence[Region]) -> tuple[LayerAction, ...]:
    actions = []
    mode_of = _ModeLookup(regions)
    for facts in layers:
        enc_files = enc_bytes = dropped = 0
        for path, size, visible in facts.files:
            if mode_of("/" + path) != "encrypted":
                continue
            if visible:
                enc_files += 1
                enc_bytes += size
            else:
                dropped += 1
        if enc_files or dropped:
            why = f"holds {enc_files} file(s) of an encrypted region"
            if dropped:
                why += f" and {dropped} hidden older cop{'y' if dropped == 1 else 'ies'} that must not ship"
            actions.append(LayerAction(facts.index, facts.digest, "rewrite", why, enc_files, enc_bytes, dropped))
        else:
            actions.append(LayerAction(facts.index, facts.digest, "reuse", "holds nothing of an encrypted region"))
    return tuple(actions)


def _region_stats(layers: Sequence[LayerFacts], regions: Sequence[Region]) -> tuple[RegionStats, ...]:
    counts = {mode: [0, 0] for mode in MODES}
    mode_of = _ModeLookup(regions)
    for facts in layers:
        for path, size, visible in facts.files:
            if visible:
                mode = mode_of("/" + path)
                counts[mode][0] += 1
                counts[mode][1] += size
    return tuple(RegionStats(mode, n, b) for mode, (n, b) in counts.items())


def make_plan(
    analysis: Any, layers: Sequence[LayerFacts], options: ConvertOptions, visible_paths: Mapping[str, str] | None = None
) -> Plan:
    """Decide the conversion. ``analysis`` is a ``sconify.analyze.Analysis``; ``layers`` the header scan.

    ``visible_paths`` maps absolute paths of the merged tree to their kind, to check that every path the
    user asked to protect exists.
    """
    error = analysis.error()
    if error is not None:
        if not analysis.argv:  # convert has a way out the analysis does not know of
            raise ConversionError(
                f"{analysis.source} has neither an Entrypoint nor a Cmd, so there is no program to run in an enclave; "
                "give one with --command, or rebuild the image with an ENTRYPOINT or CMD."
            )
        raise error
    if analysis.platform.split("/")[1:2] != ["amd64"]:
        raise error or ConversionError(f"{analysis.source} is for {analysis.platform}; SGX needs linux/amd64.")
    regions = _regions(analysis.regions, options)
    if visible_paths is not None:
        for raw in (*options.encrypt, *options.authenticate):
            path = normalize_region_path(raw)
            if path != "/" and path not in visible_paths:
                raise ConversionError(
                    f"{raw} does not exist in {analysis.source}, so it cannot be protected; check the path with "
                    "`sconify analyze`."
                )
    settings = _settings(analysis, options)
    _check_env(options.env)
    environment: dict[str, str] = {}
    for item in analysis.env:
        name, _, value = item.partition("=")
        if name and name not in RESERVED_ENV:
            environment[name] = value
    for name, value, _rule in analysis.environment:
        environment.setdefault(name, value)
    environment.update(options.env)
    # Docker sets HOME from the user's passwd entry when the image does not; the policy does it explicitly.
    environment.setdefault("HOME", analysis.user.home or "/")
    from sconify.analyze.analysis import _secret_names  # one definition of "looks like a secret"

    moved = tuple(_secret_names(environment))
    argv = tuple(analysis.argv)  # with --command, the analysis was made for that command
    if not argv:
        raise ConversionError(f"{analysis.source} has no command and none was given; pass --command.")
    user = analysis.user
    if user.uid is None or user.gid is None:
        raise ConversionError(
            f"the user {user.spec!r} of {analysis.source} cannot be resolved to a uid:gid "
            f"({user.problem or 'unknown name'}); fix the image's USER."
        )
    session = options.session or _default_session(analysis.source)
    if options.namespace:
        session = f"{options.namespace}/{session}"
    service = options.service or _default_service(analysis.source)
    executable = analysis.elf.path if analysis.elf is not None else None
    if executable is not None and not executable.startswith("/"):
        executable = "/" + executable
    relaxations = tuple(r for r, on in (("debug-mode", options.allow_debug),) if on)
    image_env = (
        ("SCONE_CONFIG_ID", f"{session}/{service}"),
        ("SCONE_CAS_ADDR", options.cas),
        ("SCONE_LAS_ADDR", options.las),
        ("SCONE_MODE", "sim"),
        ("SCONE_HEAP", str(settings.heap)),
        ("SCONE_STACK", str(settings.stack)),
        ("SCONE_THREADS", str(settings.threads)),
        ("SCONE_ALLOW_DLOPEN", settings.dlopen.label),
        ("SCONE_DEBUG", "1" if settings.debug else "0"),
        *((("SCONIFY_EXECUTABLE", executable),) if executable else ()),
        ("SCONIFY_USER", f"{user.uid}:{user.gid}"),
    )
    warnings = tuple(w.message for w in analysis.warnings)
    return Plan(
        source=analysis.source,
        source_digest=analysis.digest,
        platform=analysis.platform,
        session=session,
        service=service,
        argv=argv,
        environment=tuple(environment.items()),
        pwd=analysis.workdir or "/",
        user=f"{user.uid}:{user.gid}",
        executable=executable,
        regions=regions,
        settings=settings,
        layers=_layer_actions(layers, regions),
        image_env=image_env,
        cas=options.cas,
        las=options.las,
        relaxations=relaxations,
        region_stats=_region_stats(layers, regions),
        warnings=warnings,
        chunk_size=options.chunk_size,
        runtime=options.runtime,
        created=options.created,
        moved_secrets=moved,
    )


def _last_component(source: str) -> str:
    name = source.rsplit("/", 1)[-1]
    name = re.split(r"[:@]", name)[0] or "app"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:64] or "app"


def _default_session(source: str) -> str:
    return _last_component(source)


def _default_service(source: str) -> str:
    return _last_component(source)


def parse_env_option(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--env {item!r} is not NAME=VALUE.")
        out.append((name, value))
    return tuple(out)


__all__ = [
    "ConvertOptions",
    "LayerAction",
    "LayerFacts",
    "Plan",
    "Region",
    "RegionStats",
    "make_plan",
    "parse_size",
    "region_for",
    "normalize_region_path",
    "parse_env_option",
]
