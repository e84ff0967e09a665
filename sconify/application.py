"""Whole confidential applications (``sconify app``): several services converted into one CAS session with one
CA, mutual TLS between exactly the peers the application file names, one policy set and a Helm chart.

The file format and its JSON Schema are in docs/app.md; ``load_app`` checks a file, ``convert_app`` runs the
ordinary ``convert`` for each service and merges the results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from sconify.errors import UsageError
from sconify.plan import DEFAULT_CAS, DEFAULT_LAS, ConvertOptions, _check_env
from sconify.policy.secrets import (
    ServiceSecrets,
    TlsFiles,
    VolumeMount,
    check_service_secrets,
    parse_secret,
    parse_volume,
    secret_stem,
)
from sconify.policy.session import SESSION_VERSION, TOLERABLE, check_name, dump_yaml
from sconify.progress import SILENT, Progress
from sconify.secretfile import write_secret

CA_SECRET = "ca"

_PATH = {"type": "string", "pattern": "^/", "description": "an absolute path in the enclave's file system"}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
         "description": "a service name: lower-case letters, digits and '-' (it is also a DNS name and a chart name)"}
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}

APP_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://sconify.invalid/schemas/app-1.json",
    "title": "sconify application file",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "services"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"},
        "namespace": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"},
        "cas": {"type": "string", "minLength": 1},
        "las": {"type": "string", "minLength": 1},
        "chart": {"enum": ["umbrella", "per-service"]},
        "security": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "allow_debug": {"type": "boolean"},
                "tolerate": {"type": "array", "items": {"enum": list(TOLERABLE)}, "uniqueItems": True},
                "ignore_advisories": {"oneOf": [{"const": "*"}, {**_STRINGS, "uniqueItems": True}]},
            },
        },
        "services": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "source", "destination"],
                "properties": {
                    "name": _NAME,
                    "source": {"type": "string", "minLength": 1},
                    "destination": {"type": "string", "minLength": 1},
                    "command": {"oneOf": [{"type": "string", "minLength": 1}, {**_STRINGS, "minItems": 1}]},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "encrypt": {"type": "array", "items": _PATH},
                    "authenticate": {"type": "array", "items": _PATH},
                    "plain": {"type": "array", "items": _PATH},
                    "heap": {"type": ["string", "integer"]},
                    "stack": {"type": ["string", "integer"]},
                    "threads": {"type": "integer", "minimum": 1, "maximum": 4096},
                    "dlopen": {"enum": ["off", "protected", "unprotected"]},
                    "secrets": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.+$"},
                                "description": "NAME=KIND[:PARAMS], as --secret"},
                    "volumes": {"type": "object", "additionalProperties": _PATH,
                                "propertyNames": {"pattern": r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"}},
                    "tls": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "server": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["cert", "key", "ca"],
                                "properties": {"cert": _PATH, "key": _PATH, "ca": _PATH,
                                               "dns": {**_STRINGS, "description": "more DNS names"}},
                            },
                            "accepts": {"type": "array", "items": _NAME, "uniqueItems": True,
                                        "description": "the services that may connect to this one"},
                            "connects": {
                                "type": "object",
                                "propertyNames": _NAME,
                                "additionalProperties": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["cert", "key", "ca"],
                                    "properties": {"cert": _PATH, "key": _PATH, "ca": _PATH},
                                },
                                "description": "the services this one connects to, with where its client "
                                               "certificate, key and the CA certificate go",
                            },
                        },
                    },
                },
            },
        },
    },
}


@dataclass(frozen=True)
class AppService:
    """One service of an application: where it comes from, where it goes, its options and its secrets."""

    name: str
    source: str
    destination: str
    options: ConvertOptions
    accepts: tuple[str, ...] = ()
    connects: tuple[str, ...] = ()


@dataclass(frozen=True)
class App:
    """A checked application file."""

    path: str
    name: str
    namespace: str | None
    services: tuple[AppService, ...]
    chart: str
    relaxations: tuple[tuple[str, str], ...]  # (relaxation, why)
    tolerate: tuple[str, ...]
    ignore_advisories: tuple[str, ...] | str
    app_secrets: tuple[dict[str, Any], ...]  # the CA and the per-server peer CAs

    @property
    def session(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


def app_errors(data: Any) -> list[tuple[str, str]]:
    """Schema errors of an application document as (path in the document, what is wrong)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(APP_SCHEMA)
    out = []
    for error in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message
        if error.validator == "additionalProperties":
            message = message.replace("Additional properties are not allowed", "unknown key")
        elif error.validator == "pattern" and "description" in error.schema:
            message = f"{error.instance!r} is not {error.schema['description']}"
        out.append((where, message))
    return out


def load_app(path: Path) -> App:
    """Read, validate and resolve an application file; a problem is one ``UsageError`` naming file and path."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"application file {str(path)!r} does not exist; give the path of APP.yaml.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}).") from None
    errors = app_errors(data)
    if errors:
        where, what = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise UsageError(f"{path}: {where}: {what}{more}.")
    return resolve_app(data, str(path))


def _fail(path: str, where: str, what: str) -> UsageError:
    return UsageError(f"{path}: {where}: {what}.")


def resolve_app(data: Mapping[str, Any], path: str = "APP.yaml") -> App:
    """An ``App`` from a document that passed the schema: names, peers, secrets and relaxations checked."""
    name = data["name"]
    namespace = data.get("namespace")
    check_name(name, "application name")
    services = list(data["services"])
    by_name: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for i, svc in enumerate(services):
        if svc["name"] in by_name:
            raise _fail(path, f"services/{i}/name", f"the service {svc['name']!r} is named twice")
        by_name[svc["name"]] = (i, svc)

    # Peers: a connection needs both ends to name it, so each service trusts exactly the peers the file names.
    for i, svc in enumerate(services):
        tls = svc.get("tls") or {}
        for peer in tls.get("connects") or {}:
            where = f"services/{i}/tls/connects/{peer}"
            if peer == svc["name"]:
                raise _fail(path, where, "a service does not connect to itself over mutual TLS")
            if peer not in by_name:
                raise _fail(path, where, f"there is no service {peer!r}")
            peer_tls = by_name[peer][1].get("tls") or {}
            if "server" not in peer_tls:
                raise _fail(path, where, f"the service {peer!r} has no tls/server")
            if svc["name"] not in (peer_tls.get("accepts") or []):
                raise _fail(path, where, f"the service {peer!r} does not list {svc['name']!r} in tls/accepts")
        for j, peer in enumerate(tls.get("accepts") or []):
            where = f"services/{i}/tls/accepts/{j}"
            if "server" not in tls:
                raise _fail(path, f"services/{i}/tls", "accepts peers but has no server certificate (tls/server)")
            if peer not in by_name:
                raise _fail(path, where, f"there is no service {peer!r}")
            if svc["name"] not in ((by_name[peer][1].get("tls") or {}).get("connects") or {}):
                raise _fail(path, where, f"the service {peer!r} does not connect to {svc['name']!r} (tls/connects)")

    app_secrets: list[dict[str, Any]] = [{"name": CA_SECRET, "kind": "x509-ca", "common_name": f"{name} CA"}]
    for svc in services:
        if (svc.get("tls") or {}).get("accepts"):
            app_secrets.append({"name": _peers_ca(svc["name"]), "kind": "x509-ca", "issuer": CA_SECRET,
                                "common_name": f"{name} peers of {svc['name']}"})
    external = tuple((s["name"], s["kind"]) for s in app_secrets)

    security = data.get("security") or {}
    relaxations: list[tuple[str, str]] = []
    if security.get("allow_debug"):
        relaxations.append(("debug-mode", "security/allow_debug: every service may run as a debug enclave"))
    tolerate = tuple(security.get("tolerate") or ())
    for item in tolerate:
        if item != "debug-mode":
            relaxations.append((item, f"security/tolerate: attestation tolerates {item}"))
    advisories = security.get("ignore_advisories") or ()
    if advisories == "*":
        relaxations.append(("ignore-advisories:*", "security/ignore_advisories: every advisory is ignored"))
    else:
        for adv in advisories:
            relaxations.append((f"ignore-advisory:{adv}", f"security/ignore_advisories: {adv} is ignored"))

    resolved = []
    for i, svc in enumerate(services):
        try:
            options = _service_options(svc, data, namespace, name, bool(security.get("allow_debug")), external)
        except UsageError as exc:
            raise UsageError(f"{path}: services/{i} ({svc['name']}): {exc.message}") from None
        tls = svc.get("tls") or {}
        resolved.append(AppService(svc["name"], svc["source"], svc["destination"], options,
                                   tuple(tls.get("accepts") or ()), tuple(tls.get("connects") or {})))
    # One session: a service may use any secret the application declares, but each is declared once.
    declared: dict[str, tuple[str, str]] = {n: (k, "the application") for n, k in external}
    for i, svc in enumerate(resolved):
        for entry in svc.options.service_secrets.session_secrets(svc.name):
            if entry["name"] in declared:
                raise _fail(path, f"services/{i} ({svc.name})", f"the secret {entry['name']!r} is already declared "
                            f"by {declared[entry['name']][1]}; give it another name")
            declared[entry["name"]] = (entry["kind"], f"the service {svc.name!r}")
    for i, svc in enumerate(resolved):
        spec = svc.options.service_secrets
        own = spec.secret_names(svc.name)
        spec = replace(spec, external=tuple((n, k) for n, (k, _) in declared.items() if n not in own))
        try:
            check_service_secrets(spec, svc.name, svc.options.env)
        except UsageError as exc:
            raise UsageError(f"{path}: services/{i} ({svc.name}): {exc.message}") from None
        resolved[i] = replace(svc, options=replace(svc.options, service_secrets=spec))
    return App(
        path=path, name=name, namespace=namespace, services=tuple(resolved), chart=data.get("chart", "umbrella"),
        relaxations=tuple(relaxations),
        tolerate=tuple(sorted(set(tolerate) | ({"debug-mode"} if security.get("allow_debug") else set()))),
        ignore_advisories=advisories if advisories == "*" else tuple(advisories), app_secrets=tuple(app_secrets),
    )


def _peers_ca(service: str) -> str:
    return f"{secret_stem(service)}_peers_ca"


def _service_options(
    svc: Mapping[str, Any], data: Mapping[str, Any], namespace: str | None, session: str, allow_debug: bool,
    external: tuple[tuple[str, str], ...],
) -> ConvertOptions:
    tls = svc.get("tls") or {}
    files: list[TlsFiles] = []
    ca_files: list[tuple[str, str]] = []
    if "server" in tls:
        server = tls["server"]
        dns = (svc["name"], *[d for d in server.get("dns") or () if d != svc["name"]])
        files.append(TlsFiles("server", server["cert"], server["key"], dns, issuer=CA_SECRET))
        if tls.get("accepts"):  # client certificates of exactly the named peers are issued by this CA
            ca_files.append((server["ca"], _peers_ca(svc["name"])))
        else:
            ca_files.append((server["ca"], CA_SECRET))
    for peer, where in (tls.get("connects") or {}).items():
        files.append(TlsFiles("client", where["cert"], where["key"], issuer=_peers_ca(peer),
                              secret=f"{secret_stem(svc['name'])}_to_{secret_stem(peer)}"))
        ca_files.append((where["ca"], CA_SECRET))
    command = svc.get("command")
    if isinstance(command, str):
        import shlex

        command = shlex.split(command)
    env = tuple((k, str(v)) for k, v in (svc.get("env") or {}).items())
    _check_env(env)
    volumes: list[VolumeMount] = [parse_volume(f"{k}:{v}") for k, v in (svc.get("volumes") or {}).items()]
    spec = ServiceSecrets(
        secrets=tuple(parse_secret(s) for s in svc.get("secrets") or ()),
        tls=tuple(files),
        ca_files=tuple(ca_files),
        volumes=tuple(volumes),
        ca=CA_SECRET,
        declare_ca=False,
        external=external,
    )
    return ConvertOptions(
        encrypt=tuple(svc.get("encrypt") or ()),
        authenticate=tuple(svc.get("authenticate") or ()),
        plain=tuple(svc.get("plain") or ()),
        heap=str(svc["heap"]) if svc.get("heap") is not None else None,
        stack=str(svc["stack"]) if svc.get("stack") is not None else None,
        threads=svc.get("threads"),
        dlopen=svc.get("dlopen"),
        allow_debug=allow_debug,
        env=env,
        command=tuple(command) if command else None,
        session=session,
        namespace=namespace,
        service=svc["name"],
        cas=data.get("cas", DEFAULT_CAS),
        las=data.get("las", DEFAULT_LAS),
        service_secrets=spec,
    )


# -- conversion --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppResult:
    """What ``convert_app`` produced: one result per service and the merged session."""

    app: App
    policy_dir: str
    services: tuple[Any, ...]  # ConvertResult, in file order
    report: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.report


def merge_sessions(app: App, sessions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One session from the services' sessions: their services, images and volumes, the application's CAs and
    every service's secrets once, and the application's security."""
    secrets: dict[str, dict[str, Any]] = {s["name"]: dict(s) for s in app.app_secrets}
    volumes: dict[str, dict[str, Any]] = {}
    services: list[Any] = []
    images: list[Any] = []
    for session in sessions:
        services.extend(session["services"])
        images.extend(session.get("images") or [])
        for volume in session.get("volumes") or []:
            volumes.setdefault(volume["name"], dict(volume))
        for secret in session.get("secrets") or []:
            if secret["name"] in secrets and secrets[secret["name"]] != secret:
                raise UsageError(
                    f"{app.path}: the secret {secret['name']!r} is declared differently by two services; rename one."
                )
            secrets[secret["name"]] = dict(secret)
    return {
        "name": app.session,
        "version": SESSION_VERSION,
        "access_policy": {"read": ["CREATOR"], "update": ["CREATOR"]},
        "services": services,
        "images": images,
        "volumes": list(volumes.values()),
        "secrets": list(secrets.values()),
        "security": {
            "attestation": {
                "mode": "hardware",
                "tolerate": list(app.tolerate),
                "ignore_advisories": app.ignore_advisories if app.ignore_advisories == "*"
                else list(app.ignore_advisories),
            }
        },
    }


def convert_app(
    app: App,
    *,
    policy_out: Path,
    enclave_key_file: Path | None = None,
    sign_key_file: Path | None = None,
    cache: Any = None,
    progress: Progress = SILENT,
) -> AppResult:
    """Convert every service of ``app`` and write one policy set into ``policy_out`` (complete or absent):
    ``session.yml`` (all services), ``report.json``, ``services/NAME/`` (enclave signature, SGXS, the service's
    report) and ``chart/`` (an umbrella chart with one subchart per service) or ``charts/NAME/``."""
    from sconify.convert import convert, install_policy_dir
    from sconify.enclave.keys import enclave_key_pem, generate_enclave_key
    from sconify.image.reference import parse_reference
    from sconify.policy.session_schema import session_errors

    target = Path(policy_out)
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"the directory {str(parent)!r} for --policy-out does not exist; create it first.")
    sources = [(parse_reference(s.source), parse_reference(s.destination)) for s in app.services]
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    try:
        os.chmod(staging, 0o700)
        if enclave_key_file is None:  # one signer for the whole application
            enclave_key_file = staging / "enclave-key.pem"
            write_secret(enclave_key_file, enclave_key_pem(generate_enclave_key()), what="enclave key")
        (staging / "services").mkdir(mode=0o700)
        results, sessions = [], []
        for svc, (src, dst) in zip(app.services, sources, strict=True):
            out = staging / "services" / svc.name
            result = convert(src, dst, svc.options, policy_out=out, enclave_key_file=enclave_key_file,
                             sign_key_file=sign_key_file, progress=progress, cache=cache)
            results.append(result)
            sessions.append(yaml.safe_load((out / "session.yml").read_text()))
            (out / "session.yml").unlink()  # the application's session replaces it
        merged = merge_sessions(app, sessions)
        problems = session_errors(merged)
        if problems:  # a bug, not a user error: sconify must never write a session outside its own schema
            raise AssertionError(f"merged session does not conform: {problems[0]}")
        write_secret(staging / "session.yml", dump_yaml(merged).encode(), what="policy")
        _charts(app, staging)
        report = _report(app, results, merged)
        write_secret(staging / "report.json", json.dumps(report, indent=2, sort_keys=True).encode() + b"\n",
                     what="report")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    install_policy_dir(staging, target)
    return AppResult(app, str(target), tuple(results), report)


def _charts(app: App, staging: Path) -> None:
    """Move each service's chart out of its directory: subcharts of one umbrella chart, or charts side by side."""
    from sconify import __version__

    if app.chart == "per-service":
        (staging / "charts").mkdir()
        for svc in app.services:
            os.replace(staging / "services" / svc.name / "chart", staging / "charts" / svc.name)
        return
    umbrella = staging / "chart"
    (umbrella / "charts").mkdir(parents=True)
    for svc in app.services:
        os.replace(staging / "services" / svc.name / "chart", umbrella / "charts" / svc.name)
    chart = {
        "apiVersion": "v2",
        "name": _chart_name(app.name),
        "description": f"Confidential application {app.name} ({len(app.services)} services) converted by sconify.",
        "type": "application",
        "version": "0.1.0",
        "appVersion": "latest",
        "annotations": {"sconify.io/version": __version__},
    }
    (umbrella / "Chart.yaml").write_text(dump_yaml(chart))
    (umbrella / "values.yaml").write_text(dump_yaml({svc.name: {} for svc in app.services}))


def _chart_name(text: str) -> str:
    from sconify.policy.chart import chart_name

    return chart_name(text)


def _report(app: App, results: Sequence[Any], merged: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "application": app.name,
        "session": app.session,
        "file": app.path,
        "services": [
            {
                "name": svc.name,
                "source": r.plan.source,
                "destination": r.destination,
                "digest": r.digest,
                "mrenclave": r.mrenclave,
                "mrsigner": r.mrsigner,
                "config_id": r.plan.config_id,
                "accepts": list(svc.accepts),
                "connects": list(svc.connects),
                "volumes": svc.options.service_secrets.image_volumes(),
                "warnings": list(r.plan.warnings),
            }
            for svc, r in zip(app.services, results, strict=True)
        ],
        "secrets": [s["name"] for s in merged["secrets"]],
        "relaxations": [{"relaxation": r, "why": why} for r, why in app.relaxations],
        "strict": not app.relaxations,
    }

