"""Batch job specs: the JOBS.yaml format and its JSON Schema, the plain-data ``JobSpec``, and the idempotency key.

A jobs file lists conversions and the defaults they share::

    version: 1
    broker: redis://queue.example:6379/0     # optional: run on Celery workers instead of locally
    defaults:
      destination: docker://registry.example/confidential/{name}:1
      fspf-key: keys/fspf.key
      enclave-key: keys/enclave.pem
      heap: 1G
    jobs:
      - name: nginx
        source: docker://registry.example/vendor/nginx:1.25
        encrypt: [/etc/nginx]

Fields carry the names of ``sconify convert``'s flags (``policy-out``, ``fspf-key``, ``allow-debug``, ...; an
underscore works as well as a dash), except that ``name`` names the job and ``session`` the CAS session
(``--name`` on the command line). A job's own value replaces the default; ``{name}`` in ``destination`` and
``policy-out`` becomes the job's name. Relative paths, in fields and in ``oci:``/archive references, are taken
from the jobs file's directory.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sconify import __version__
from sconify.errors import NotFoundError, SconifyError, UsageError
from sconify.image.reference import DOCKER_ARCHIVE, DOCKER_DAEMON, OCI, OCI_ARCHIVE, Reference, parse_reference
from sconify.image.transports import TransportOptions
from sconify.plan import DEFAULT_CAS, DEFAULT_LAS, ConvertOptions, options_from_flags

FORMAT_VERSION = 1
KEY_VERSION = 1
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
DEFAULT_POLICY_OUT = "policies/{name}"

_STRING = {"type": "string", "minLength": 1}
_STRINGS = {"oneOf": [_STRING, {"type": "array", "items": _STRING}]}
_SIZE = {"oneOf": [{"type": "integer", "minimum": 4096}, {"type": "string", "pattern": r"^[0-9]+\s*[A-Za-z]*$"}]}

# Every option a job (or the defaults) may set, by its name in the jobs file.
OPTION_SCHEMAS: dict[str, dict[str, Any]] = {
    "destination": _STRING,
    "policy-out": _STRING,
    "encrypt": _STRINGS,
    "authenticate": _STRINGS,
    "plain": _STRINGS,
    "rules": _STRINGS,
    "heap": _SIZE,
    "stack": _SIZE,
    "threads": {"type": "integer", "minimum": 1},
    "dlopen": {"enum": ["off", "protected", "unprotected"]},
    "allow-debug": {"type": "boolean"},
    "layer-compression": {"enum": ["auto", "gzip", "none"]},
    "env": {
        "oneOf": [
            {"type": "object", "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
             "additionalProperties": {"type": ["string", "number", "boolean"]}},
            {"type": "array", "items": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*="}},
        ]
    },
    "command": _STRINGS,
    "session": _STRING,
    "namespace": _STRING,
    "service": _STRING,
    "cas": _STRING,
    "las": _STRING,
    "runtime": _STRING,
    "fspf-key": _STRING,
    "enclave-key": _STRING,
    "sign-key": _STRING,
    "secrets": _STRING,
    "inject": _STRING,
    "platform": {"type": "string", "pattern": r"^[a-z0-9_]+/[a-z0-9_]+(/[a-z0-9_]+)?$"},
    "secret": _STRINGS,
    "tls-server": _STRINGS,
    "tls-client": _STRINGS,
    "tls-ca": _STRINGS,
    "volume": _STRINGS,
    **{f"{side}-{what}": schema for side in ("src", "dest") for what, schema in (
        ("authfile", _STRING), ("tls-verify", {"type": "boolean"}), ("cert-dir", _STRING),
        ("daemon-host", _STRING))},
}

JOBS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sconify batch jobs file",
    "type": "object",
    "additionalProperties": False,
    "required": ["jobs"],
    "properties": {
        "version": {"const": FORMAT_VERSION},
        "broker": {"type": "string", "pattern": r"^rediss?://"},
        "defaults": {"type": "object", "additionalProperties": False, "properties": OPTION_SCHEMAS},
        "jobs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["source"],
                "properties": {"name": {"type": "string", "pattern": NAME_RE}, "source": _STRING, **OPTION_SCHEMAS},
            },
        },
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(JOBS_SCHEMA)
_PATH_FIELDS = ("policy_out", "fspf_key", "enclave_key", "sign_key", "secrets", "inject", "src_authfile",
                "src_cert_dir", "dest_authfile", "dest_cert_dir")
FILE_TRANSPORTS = (OCI, OCI_ARCHIVE, DOCKER_ARCHIVE)


@dataclass(frozen=True)
class JobSpec:
    """One conversion of a batch, as plain data: what ``sconify convert`` would be given, paths absolute.

    ``source_digest`` is the source's manifest digest when it is known before the job runs (a digest
    reference, or the tag resolved when the job was submitted); the job records the digest it really read.
    """

    name: str
    source: str
    destination: str
    policy_out: str
    encrypt: tuple[str, ...] = ()
    authenticate: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    heap: str | None = None
    stack: str | None = None
    threads: int | None = None
    dlopen: str | None = None
    allow_debug: bool = False
    layer_compression: str = "auto"
    env: tuple[str, ...] = ()  # NAME=VALUE, in order
    command: tuple[str, ...] | None = None
    session: str | None = None
    namespace: str | None = None
    service: str | None = None
    cas: str = DEFAULT_CAS
    las: str = DEFAULT_LAS
    runtime: str | None = None
    fspf_key: str | None = None
    enclave_key: str | None = None
    sign_key: str | None = None
    secrets: str | None = None
    inject: str | None = None
    platform: str | None = None
    secret: tuple[str, ...] = ()  # secrets the CAS generates, TLS files and volumes (--secret, --tls-*, --volume)
    tls_server: tuple[str, ...] = ()
    tls_client: tuple[str, ...] = ()
    tls_ca: tuple[str, ...] = ()
    volume: tuple[str, ...] = ()
    src_authfile: str | None = None
    src_tls_verify: bool | None = None
    src_cert_dir: str | None = None
    src_daemon_host: str | None = None
    dest_authfile: str | None = None
    dest_tls_verify: bool | None = None
    dest_cert_dir: str | None = None
    dest_daemon_host: str | None = None
    source_digest: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form data of the submitter, not in the key

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON data (lists for tuples); ``from_json`` reads it back."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else (dict(value) if f.name == "extra" else value)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                continue  # a newer sconify's field: ignore rather than refuse
            if isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def convert_options(self) -> ConvertOptions:
        """The ``ConvertOptions`` this job converts with (the same mapping as ``sconify convert``)."""
        from dataclasses import asdict

        return options_from_flags(asdict(self))

    def source_reference(self) -> Reference:
        return parse_reference(self.source)

    def destination_reference(self) -> Reference:
        return parse_reference(self.destination)

    def source_transport(self) -> TransportOptions:
        """Transport options for reading the source (credentials from the authfile or the docker config)."""
        return self._transport("src")

    def dest_transport(self) -> TransportOptions:
        """Transport options for writing the destination."""
        return self._transport("dest")

    def _transport(self, side: str) -> TransportOptions:
        return TransportOptions(
            authfile=getattr(self, f"{side}_authfile"),
            tls_verify=getattr(self, f"{side}_tls_verify"),
            daemon_host=getattr(self, f"{side}_daemon_host"),
            cert_dir=getattr(self, f"{side}_cert_dir"),
        )


@dataclass(frozen=True)
class JobsFile:
    """A parsed and checked jobs file."""

    path: Path
    broker: str | None
    specs: tuple[JobSpec, ...]


# -- reading a jobs file ---------------------------------------------------------------------------------


def _normalise_keys(data: Any) -> Any:
    """Accept ``policy_out`` as well as ``policy-out`` in the option mappings."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for section in ("defaults",):
        if isinstance(out.get(section), dict):
            out[section] = {str(k).replace("_", "-"): v for k, v in out[section].items()}
    if isinstance(out.get("jobs"), list):
        out["jobs"] = [{str(k).replace("_", "-"): v for k, v in j.items()} if isinstance(j, dict) else j
                       for j in out["jobs"]]
    return out


def _where(data: dict[str, Any], path: Sequence[Any]) -> tuple[str, list[Any]]:
    """Name the place of a schema error: the job (number and name) or the defaults, and the rest of the path."""
    parts = list(path)
    if len(parts) >= 2 and parts[0] == "jobs" and isinstance(parts[1], int):
        index = parts[1]
        job = data["jobs"][index] if index < len(data.get("jobs") or []) else None
        name = job.get("name") if isinstance(job, dict) else None
        source = job.get("source") if isinstance(job, dict) else None
        label = f"job {index + 1}"
        if isinstance(name, str):
            label += f" ({name!r})"
        elif isinstance(source, str):
            label += f" (source {source!r})"
        return label, parts[2:]
    if parts and parts[0] == "defaults":
        return "defaults", parts[1:]
    return "the file", parts


def _describe(data: dict[str, Any], error: jsonschema.ValidationError) -> str:
    where, rest = _where(data, error.absolute_path)
    fieldname = f", field {rest[0]!r}" if rest else ""
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        allowed = sorted((error.schema.get("properties") or {}).keys())
        hints = []
        for name in extra:
            close = difflib.get_close_matches(name, allowed, n=1)
            hints.append(f"unknown field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"{where}: {', '.join(hints)}"
    if error.validator == "required":
        return f"{where}: {error.message.replace('is a required property', 'is missing')}"
    if error.validator == "enum":
        return f"{where}{fieldname}: {error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern" and rest and rest[0] == "name":
        return f"{where}{fieldname}: {error.instance!r} is not a job name (letters, digits, '.', '_', '-')"
    if error.validator in ("oneOf", "pattern"):
        return f"{where}{fieldname}: {error.instance!r} has the wrong type or form"
    if error.validator == "const" and rest == ["version"]:
        return f"{where}: unknown jobs file version {error.instance!r} (this sconify reads version {FORMAT_VERSION})"
    return f"{where}{fieldname}: {error.message}"


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _env(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in value.items())
    return tuple(value)


def _command(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(value)


def _absolute(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


def absolute_reference(text: str, base: Path) -> str:
    """The reference with the path of an ``oci:``/archive reference made absolute against ``base``."""
    ref = parse_reference(text)
    if ref.transport in FILE_TRANSPORTS and ref.path is not None:
        return str(replace(ref, path=_absolute(base, ref.path)))
    return str(ref)


def spec_from_fields(name: str, values: Mapping[str, Any], base: Path) -> JobSpec:
    """A ``JobSpec`` from the merged fields of one job (jobs-file names), paths taken relative to ``base``."""
    def get(key: str) -> Any:
        return values.get(key)

    def templated(key: str, default: str | None = None) -> str | None:
        value = get(key) if get(key) is not None else default
        return None if value is None else str(value).replace("{name}", name)

    destination = templated("destination")
    if destination is None:
        raise UsageError(f"no 'destination' is given for job {name!r}; give one in the job or in 'defaults'.")
    heap, stack = get("heap"), get("stack")
    paths: dict[str, Any] = {f: _absolute(base, get(f.replace("_", "-"))) for f in _PATH_FIELDS if f != "policy_out"}
    spec = JobSpec(
        name=name,
        source=absolute_reference(str(get("source")), base),
        destination=absolute_reference(destination, base),
        policy_out=_absolute(base, templated("policy-out", DEFAULT_POLICY_OUT)) or "",
        encrypt=_strings(get("encrypt")),
        authenticate=_strings(get("authenticate")),
        plain=_strings(get("plain")),
        rules=tuple(_absolute(base, r) or r for r in _strings(get("rules"))),
        heap=None if heap is None else str(heap),
        stack=None if stack is None else str(stack),
        threads=get("threads"),
        dlopen=get("dlopen"),
        allow_debug=bool(get("allow-debug")),
        layer_compression=get("layer-compression") or "auto",
        env=_env(get("env")),
        command=_command(get("command")),
        session=get("session"),
        namespace=get("namespace"),
        service=get("service"),
        cas=get("cas") or DEFAULT_CAS,
        las=get("las") or DEFAULT_LAS,
        runtime=get("runtime"),
        platform=get("platform"),
        secret=_strings(get("secret")),
        tls_server=_strings(get("tls-server")),
        tls_client=_strings(get("tls-client")),
        tls_ca=_strings(get("tls-ca")),
        volume=_strings(get("volume")),
        src_tls_verify=get("src-tls-verify"),
        src_daemon_host=get("src-daemon-host"),
        dest_tls_verify=get("dest-tls-verify"),
        dest_daemon_host=get("dest-daemon-host"),
        **paths,
    )
    spec.convert_options()  # the env entries and secrets are checked here, and named by job
    return spec


def _default_name(source: str, index: int) -> str:
    """A job name from the source reference: its last path component and tag (``nginx-1.25``)."""
    try:
        ref = parse_reference(source)
    except SconifyError:
        return f"job-{index + 1}"
    base = (ref.repository or ref.path or "").rstrip("/").split("/")[-1] or "image"
    text = f"{base}-{ref.tag}" if ref.tag else base
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or f"job-{index + 1}"
    return text[:120]


def parse_jobs(data: Any, path: Path) -> JobsFile:
    """Check parsed YAML against the schema and make the specs; one UsageError lists every problem."""
    label = str(path)
    if not isinstance(data, dict):
        raise UsageError(f"{label} is not a jobs file: it must be a mapping with a 'jobs' list (see docs/batch.md).")
    data = _normalise_keys(data)
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [_describe(data, e) for e in errors]
    if problems:
        raise UsageError(_summary(label, problems))
    defaults = data.get("defaults") or {}
    base = path.parent.resolve()
    specs: list[JobSpec] = []
    seen: dict[str, int] = {}
    for index, job in enumerate(data["jobs"]):
        name = job.get("name") or _default_name(job["source"], index)
        label_job = f"job {index + 1} ({name!r})"
        if name in seen:
            problems.append(f"{label_job}: the name is already used by job {seen[name] + 1}; give each job its "
                            "own 'name'")
            continue
        seen[name] = index
        try:
            specs.append(spec_from_fields(name, {**defaults, **job}, base))
        except SconifyError as exc:  # a bad reference or env entry: name the job
            problems.append(f"{label_job}: {exc.message.rstrip('.')}")
    if problems:
        raise UsageError(_summary(label, problems))
    return JobsFile(path, data.get("broker"), tuple(specs))


def _summary(label: str, problems: list[str]) -> str:
    shown = problems[:10]
    more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    noun = "an error" if len(problems) == 1 else f"{len(problems)} errors"
    return f"{label} has {noun}: {'; '.join(shown)}{more}. Fix the jobs file and run again."


def load_jobs(path: Path) -> JobsFile:
    """Read and check a jobs file (YAML or JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFoundError(f"the jobs file {str(path)!r} does not exist; give the path of a JOBS.yaml.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"the jobs file {str(path)!r} cannot be read ({exc}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"the jobs file {str(path)!r} is not valid YAML{where}; fix its syntax.") from None
    return parse_jobs(data, path)


# -- the idempotency key --------------------------------------------------------------------------------


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_id(path: str | None) -> str | None:
    """A digest of a file's content (secrets and injection files end up in the policy)."""
    if path is None:
        return None
    try:
        return _file_sha256(path)
    except OSError:
        return f"unreadable:{path}"


def _rules_id(directory: str) -> str:
    digest = hashlib.sha256()
    root = Path(directory)
    for file in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
        digest.update(str(file.relative_to(root)).encode() + b"\0" + _file_sha256(file).encode() + b"\0")
    return f"{directory}:{digest.hexdigest()}"


def _runtime_id(spec: JobSpec) -> str:
    if spec.runtime:
        return f"image:{spec.runtime}"
    from sconify.build.runtime import BUILTIN, RUNTIME_ENV

    path = os.environ.get(RUNTIME_ENV) or str(BUILTIN)
    return _builtin_runtime_id(path, _stamp(path))


@functools.lru_cache(maxsize=8)
def _builtin_runtime_id(path: str, stamp: tuple[int, int]) -> str:
    try:
        return f"builtin:{_file_sha256(path)}"
    except OSError:
        return f"builtin:missing:{path}"


@functools.lru_cache(maxsize=256)
def _key_fingerprint(kind: str, path: str, stamp: tuple[int, int]) -> str:
    """One key file's public identity; cached by path and (mtime, size), since loading RSA keys is slow."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if kind == "fspf":  # the file format of convert's --fspf-key: 64 hex digits
        from sconify.fspf.crypto import VolumeKey
        from sconify.secretfile import read_secret

        text = read_secret(Path(path), "FSPF key").decode("ascii", "replace")
        return VolumeKey.from_hex(text).key_id.hex()
    if kind == "enclave":
        from sconify.enclave.keys import load_enclave_public_key, mrsigner_of_key

        try:  # only the modulus counts here; the conversion checks the whole key (slow for RSA) itself
            key = serialization.load_pem_private_key(Path(path).read_bytes(), None,
                                                     unsafe_skip_rsa_key_validation=True)
        except Exception:  # encrypted, a public key, or broken: the checking loader says which
            return mrsigner_of_key(load_enclave_public_key(Path(path))).hex()
        if not isinstance(key, rsa.RSAPrivateKey):
            return mrsigner_of_key(load_enclave_public_key(Path(path))).hex()
        return mrsigner_of_key(key).hex()
    from sconify.signing.keys import load_signing_key

    public = load_signing_key(Path(path)).public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, -1)  # the loader names the problem
    return (st.st_mtime_ns, st.st_size)


def key_identities(spec: JobSpec) -> dict[str, str | None]:
    """The public identities of the job's keys: never the keys themselves.

    The FSPF key by its key id (a one-way fingerprint the volume header carries too), the enclave key by its
    MRSIGNER, the image-signing key by a SHA-256 of its public key. Unreadable keys raise their error.
    """
    out: dict[str, str | None] = {"fspf": "random", "enclave": "generated", "sign": None}
    for kind, path in (("fspf", spec.fspf_key), ("enclave", spec.enclave_key), ("sign", spec.sign_key)):
        if path is not None:
            out[kind] = _key_fingerprint(kind, path, _stamp(path))
    return out


def job_key(spec: JobSpec, identities: Mapping[str, str | None] | None = None) -> str:
    """The idempotency key of a job: SHA-256 over the source (and its digest when known), the destination and
    policy directory, the options, the rules, secrets and injection files, the runtime and the key identities.

    Two jobs with the same key produce the same output, so a job whose key succeeded before is not run again.
    The job's name and the registry credentials are not part of it.
    """
    source = parse_reference(spec.source)
    digest = spec.source_digest or source.digest
    parts = {
        "key_version": KEY_VERSION,
        "sconify": __version__,
        "source": str(source),
        "source_digest": digest,
        "destination": str(parse_reference(spec.destination)),
        "policy_out": spec.policy_out,
        "options": asdict(spec.convert_options()),
        "platform": spec.platform,
        "rules": [_rules_id(r) for r in spec.rules],
        "secrets": _content_id(spec.secrets),
        "inject": _content_id(spec.inject),
        "runtime": _runtime_id(spec),
        "keys": dict(identities if identities is not None else key_identities(spec)),
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def pin_source(spec: JobSpec) -> JobSpec:
    """The spec with ``source_digest`` set: the digest of a digest reference, or the tag resolved now.

    Resolving reads the manifest only (no layers). ``docker-daemon:`` sources are not resolved ahead (that
    would need the engine); their key is the reference.
    """
    ref = parse_reference(spec.source)
    if spec.source_digest:
        return spec
    if ref.digest:
        return replace(spec, source_digest=ref.digest)
    if ref.transport == DOCKER_DAEMON:
        return spec
    from sconify.image.model import Platform
    from sconify.image.transports import open_image

    image = open_image(ref, Platform.parse(spec.platform) if spec.platform else None, spec.source_transport())
    return replace(spec, source_digest=image.digest)
