"""``convert``: a native image in, a confidential image plus its policy, enclave signature, chart and report
out. It joins the parts: open -> analyze -> scan -> plan -> build layers -> measure -> sign -> emit."""

from __future__ import annotations

import copy
import datetime as dt
import gc
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from sconify import __version__
from sconify.analyze.analysis import Analysis, analyze_image
from sconify.analyze.files import HeaderCache, LayerHeaders, ReadFingerprint
from sconify.build.cache import LayerCache
from sconify.build.layers import LayerBuilder, LayerOutput
from sconify.build.runtime import Runtime, builtin_runtime, runtime_from_image, runtime_layer_entries, write_entries
from sconify.build.scan import Scan, scan_from
from sconify.enclave.keys import generate_enclave_key, load_enclave_key
from sconify.enclave.measurement import Measurement, measure
from sconify.enclave.sigstruct import SigstructBody, sign
from sconify.errors import ConversionError, KeyMaterialError, UsageError
from sconify.fspf.crypto import VolumeKey
from sconify.fspf.format import Region as FsRegion
from sconify.fspf.format import RegionMode, RegionTable
from sconify.fspf.writer import VolumeResult, VolumeWriter, volume_path
from sconify.image import mediatypes as mt
from sconify.image.copy import manifest_bytes
from sconify.image.model import Descriptor, Image, Platform, sha256_digest
from sconify.image.reference import DOCKER, OCI, Reference
from sconify.image.spool import BlobSpool
from sconify.image.streams import GzipWriter
from sconify.image.transports import TransportOptions, open_destination, open_image
from sconify.image.transports.base import Destination
from sconify.plan import ConvertOptions, Plan, make_plan
from sconify.policy.chart import ChartSpec, write_chart
from sconify.policy.secrets import ServiceSecrets, check_service_secrets
from sconify.policy.session import ServiceSpec, Session
from sconify.progress import SILENT, Progress
from sconify.rules import load_rules
from sconify.secretfile import make_private_dir, read_secret, write_secret_files

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "io.sconify"
# Layers built at once. Hashing, sealing and writing release the GIL, so with uncompressed sources a third
# layer keeps two cores busy while another waits on I/O; with compressed sources the third brings no speed and
# costs about 25 MB (measured for BENCHMARKS.md).
PARALLEL_LAYERS = 3
PARALLEL_COMPRESSED_LAYERS = 2


def _layer_workers(image: Image, plan: Plan) -> int:
    rewritten = [image.layers[a.index] for a in plan.layers if a.action == "rewrite"]
    compressed = any(layer.descriptor.digest != layer.diff_id for layer in rewritten)
    return max(1, min(PARALLEL_COMPRESSED_LAYERS if compressed else PARALLEL_LAYERS, len(plan.layers)))


@dataclass(frozen=True)
class Keys:
    """The key material of one conversion; each comes from an explicit source (file or fresh randomness)."""

    fspf: VolumeKey
    fspf_origin: str
    enclave: Any  # rsa.RSAPrivateKey
    enclave_origin: str
    signing: Any | None  # ec.EllipticCurvePrivateKey
    signing_origin: str | None


def load_fspf_key(path: Path | None) -> tuple[VolumeKey, str]:
    """The volume key from a file of 64 hex digits, or a fresh random key."""
    if path is None:
        return VolumeKey.generate(), "random"
    text = read_secret(path, "FSPF key").decode("ascii", "replace").strip()
    if len(text) != 64:
        raise KeyMaterialError(
            f"FSPF key file {str(path)!r} must hold 64 hex digits (32 bytes); make one with "
            "`head -c 32 /dev/urandom | xxd -p -c 64`."
        )
    return VolumeKey.from_hex(text), str(path)


@dataclass(frozen=True)
class Prepared:
    """A source opened, analyzed, scanned and planned: everything ``--dry-run`` shows."""

    image: Image
    analysis: Analysis
    scan: Scan
    plan: Plan
    # Layers the analysis read without verifying them (``defer_verification``), with what each read saw;
    # convert verifies each in full and checks that the analysis saw the verified bytes.
    unverified: Mapping[int, tuple[ReadFingerprint, ...]] = field(default_factory=dict)
    headers: tuple[LayerHeaders, ...] = ()  # each layer's header scan


def _created(image: Image, options: ConvertOptions) -> str:
    if options.created:
        return options.created
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return dt.datetime.fromtimestamp(int(epoch), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    created = image.config.get("created")
    return str(created) if created else "1970-01-01T00:00:00Z"


def _epoch(created: str) -> Decimal:
    try:
        text = created.replace("Z", "+00:00")
        if "." in text:  # Python's fromisoformat takes at most 6 fraction digits
            head, _, rest = text.partition(".")
            digits = "".join(c for c in rest if c.isdigit())
            tz = rest[len(digits) :]
            text = f"{head}.{digits[:6]}{tz}"
        return Decimal(int(dt.datetime.fromisoformat(text).timestamp()))
    except ValueError:
        return Decimal(0)


def prepare(
    source: Reference,
    options: ConvertOptions,
    *,
    platform: Platform | None = None,
    transport: TransportOptions | None = None,
    rules_dirs: Sequence[Path] = (),
    progress: Progress = SILENT,
    header_cache: HeaderCache | None = None,
    defer_verification: bool = False,
    spool: BlobSpool | None = None,
) -> Prepared:
    """Open, analyze, scan and plan; no output is written. With ``defer_verification`` some layers may be read
    unverified (see ``analyze_image``); the caller must then verify ``Prepared.unverified`` itself."""
    image = open_image(source, platform, transport)
    if spool is not None:  # blobs from a registry are downloaded once, however often they are read
        from dataclasses import replace

        image = replace(image, source=spool.wrap(image.source))
    analyzed = analyze_image(
        with_command(image, options.command), load_rules(rules_dirs), source=str(source), progress=progress,
        cache=header_cache, defer_verification=defer_verification,
    )
    analysis = analyzed.analysis
    scan = scan_from(image, analyzed.tree, [h.entries for h in analyzed.headers])
    plan = make_plan(analysis, scan.layers, replace_created(options, _created(image, options)), scan.visible_paths())
    return Prepared(image, analysis, scan, plan, analyzed.unverified, analyzed.headers)


def with_command(image: Image, command: Sequence[str] | None) -> Image:
    """The image as the analysis should see it when ``--command`` replaces its Entrypoint and Cmd.

    Only the config the analysis reads changes; layers, digests and the image that is converted stay the same.
    """
    if command is None:
        return image
    from dataclasses import replace

    config = copy.deepcopy(image.config)
    inner = dict(config.get("config") or {})
    inner["Entrypoint"] = list(command)
    inner.pop("Cmd", None)
    config["config"] = inner
    return replace(image, config_bytes=json.dumps(config).encode())


def replace_created(options: ConvertOptions, created: str) -> ConvertOptions:
    from dataclasses import replace

    return replace(options, created=created)


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion produced."""

    plan: Plan
    destination: str
    digest: str
    mrenclave: str
    mrsigner: str
    fspf_tag: str
    policy_dir: str
    signature: str | None
    layers: tuple[dict[str, Any], ...]
    timings: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.plan.source,
            "source_digest": self.plan.source_digest,
            "destination": self.destination,
            "digest": self.digest,
            "mrenclave": self.mrenclave,
            "mrsigner": self.mrsigner,
            "fspf_tag": self.fspf_tag,
            "config_id": self.plan.config_id,
            "policy_dir": self.policy_dir,
            "signature": self.signature,
            "layers": list(self.layers),
            "timings": self.timings,
        }


def _fs_regions(plan: Plan) -> RegionTable:
    return RegionTable(tuple(FsRegion(volume_path(r.path.lstrip("/")), RegionMode.parse(r.mode)) for r in plan.regions))


def _seal_volume(
    plan: Plan, outputs: Sequence[LayerOutput], regions: RegionTable, key: VolumeKey, mtime: Decimal
) -> VolumeResult:
    writer = VolumeWriter(
        regions, key, chunk_size=plan.chunk_size, metadata_path=plan.metadata_path, metadata_mtime=mtime
    )
    for out in outputs:
        for record in out.records:
            writer.admit(record.entry)
            if record.chunks is not None:
                assert record.size is not None
                writer.record_file(volume_path(record.entry.path), record.size, record.chunks)
    return writer.finish()


def _new_layer(dest: Destination, family: str, entries: list, mtime: Decimal) -> tuple[Descriptor, str]:
    writer = dest.new_blob(mt.layer_type(family, dest.preferred_compression))
    try:
        if dest.preferred_compression == mt.GZIP:
            gz = GzipWriter(writer)
            write_entries(gz, entries, mtime)
            gz.close()
            diff_id = gz.diff_id
        else:
            from sconify.image.streams import HashingWriter

            hashing = HashingWriter(writer)  # type: ignore[arg-type]
            write_entries(hashing, entries, mtime)
            diff_id = hashing.digest
    except BaseException:
        writer.abort()
        raise
    return writer.commit(), diff_id


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for value in secrets:
        if value:
            text = text.replace(value, "<moved to the policy by sconify>")
    return text


def new_config(
    image: Image, plan: Plan, diff_ids: Sequence[str], outputs: Sequence[LayerOutput], created: str
) -> dict[str, Any]:
    """The confidential image's config: the runtime as entrypoint, only the runtime's variables in Env, the
    command and environment gone to the policy, secrets scrubbed from history and labels."""
    config = copy.deepcopy(image.config)
    secrets = [v for k, v in plan.environment if k in plan.moved_secrets and len(v) >= 4]
    inner = dict(config.get("config") or {})
    inner["Entrypoint"] = [plan.runtime_path]
    inner.pop("Cmd", None)
    inner["Env"] = [f"{k}={v}" for k, v in plan.image_env]
    inner["User"] = "0:0"
    inner.pop("Shell", None)
    inner.pop("OnBuild", None)
    if inner.get("Labels"):
        inner["Labels"] = {k: _scrub(str(v), secrets) for k, v in inner["Labels"].items()}
    config["config"] = inner
    for legacy in ("container_config", "container"):  # Docker's build-time copies of Env and Cmd
        config.pop(legacy, None)
    config["created"] = created
    config["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    history = [dict(h) for h in config.get("history") or []]
    rewritten = {a.index for a in plan.layers if a.action == "rewrite"}
    layer_no = 0
    for entry in history:
        for key in ("created_by", "comment"):
            if isinstance(entry.get(key), str):
                entry[key] = _scrub(entry[key], secrets)
        if not entry.get("empty_layer"):
            if layer_no in rewritten:
                entry["comment"] = "sconify: rewritten, encrypted files sealed in place"
            layer_no += 1
    if not history:
        history = [{"created": created, "comment": "layer from the source image"} for _ in outputs]
    history.append({"created": created, "created_by": f"sconify {__version__}: runtime", "comment": "runtime layer"})
    history.append(
        {"created": created, "created_by": f"sconify {__version__}: file-system protection", "comment": "FSPF metadata"}
    )
    config["history"] = history
    return config


def _session(
    plan: Plan,
    mrenclave: str,
    volume: VolumeResult,
    extra_secrets: Sequence[dict[str, Any]],
    injections: Sequence[dict[str, Any]],
    declared: ServiceSecrets | None = None,
) -> Session:
    image_name = f"{plan.service}-image"
    declared = declared or ServiceSecrets()
    service = ServiceSpec(
        name=plan.service,
        image_name=image_name,
        mrenclaves=(mrenclave,),
        command=plan.argv,
        environment=plan.environment,
        pwd=plan.pwd,
        fspf_path=plan.metadata_path,
        fspf_key=volume.key.hex(),
        fspf_tag=volume.tag.hex(),
    )
    return Session(
        name=plan.session,
        services=(service,),
        images=(
            {
                "name": image_name,
                "injection_files": [*declared.injection_files(plan.service), *injections],
                "volumes": declared.image_volumes(),
            },
        ),
        volumes=tuple(declared.session_volumes()),
        secrets=(*declared.session_secrets(plan.service), *extra_secrets),
        tolerate=plan.relaxations,
    )


def _load_yaml_list(path: Path | None, key: str) -> list[dict[str, Any]]:
    if path is None:
        return []
    import yaml

    try:
        data = yaml.safe_load(read_secret(path, key))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML ({exc}).") from None
    if isinstance(data, dict):
        data = data.get(key, data.get(key.replace("_", "-")))
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise UsageError(f"{path} must hold a list of {key} (mappings), optionally under the key '{key}'.")
    return data


def stage_policy_dir(target: Path, files: dict[str, bytes], chart: ChartSpec) -> Path:
    """Write the policy directory's files into a private staging directory beside ``target``."""
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"the directory {str(parent)!r} for --policy-out does not exist; create it first.")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    try:
        os.chmod(staging, 0o700)
        write_secret_files(staging, files)
        write_chart(chart, staging / "chart")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def install_policy_dir(staging: Path, target: Path) -> None:
    """Swap a staged policy directory into place, so that it is complete or absent."""
    parent = target.absolute().parent
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, old / "x")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        make_private_dir(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sign_image(dest_ref: Reference, digest: str, key: Any, transport: TransportOptions | None) -> str | None:
    from sconify.signing.cosign import sign as cosign_sign
    from sconify.signing.cosign import signature_manifest, signature_tag, simple_signing_payload, write_signature

    if dest_ref.transport not in (DOCKER, OCI):
        log.warning("signatures are stored for docker:// and oci: destinations only; %s stays unsigned", dest_ref)
        return None
    identity = dest_ref.name or str(dest_ref.path)
    payload = simple_signing_payload(identity, digest)
    sig = signature_manifest(payload, cosign_sign(key, payload))
    sig_ref = Reference(
        dest_ref.transport,
        registry=dest_ref.registry,
        repository=dest_ref.repository,
        tag=signature_tag(digest),
        path=dest_ref.path,
    )
    return write_signature(open_destination(sig_ref, transport), sig)


def convert(source: Reference, destination: Reference, options: ConvertOptions, **kwargs: Any) -> ConvertResult:
    """Convert ``source`` into ``destination``; write the policy, signature, chart and report.

    Keyword arguments are those of ``_convert``. Blobs read from a registry are kept in a private temporary
    directory for the length of the conversion (about the size of the image's compressed layers), so that each
    is downloaded once.
    """
    with BlobSpool() as spool:
        return _convert(source, destination, options, spool=spool, **kwargs)


def _convert(
    source: Reference,
    destination: Reference,
    options: ConvertOptions,
    *,
    spool: BlobSpool | None = None,
    policy_out: Path,
    fspf_key_file: Path | None = None,
    enclave_key_file: Path | None = None,
    enclave_key_passphrase: bytes | None = None,
    sign_key_file: Path | None = None,
    sign_key_passphrase: bytes | None = None,
    secrets_file: Path | None = None,
    inject_file: Path | None = None,
    platform: Platform | None = None,
    src_transport: TransportOptions | None = None,
    dest_transport: TransportOptions | None = None,
    rules_dirs: Sequence[Path] = (),
    progress: Progress = SILENT,
    cache: LayerCache | None = None,
) -> ConvertResult:
    """See ``convert``."""
    timings: dict[str, float] = {}
    started = time.monotonic()

    # Keys first: a wrong key must fail before any work is done.
    fspf_key, fspf_origin = load_fspf_key(fspf_key_file)
    if enclave_key_file is not None:
        enclave_key, enclave_origin = load_enclave_key(enclave_key_file, enclave_key_passphrase), str(enclave_key_file)
    else:
        enclave_key, enclave_origin = generate_enclave_key(), "generated"
    signing_key = None
    if sign_key_file is not None:
        from sconify.signing.keys import load_signing_key

        signing_key = load_signing_key(sign_key_file, sign_key_passphrase)
    extra_secrets = _load_yaml_list(secrets_file, "secrets")
    injections = _load_yaml_list(inject_file, "injection_files")

    # The analysis may read local uncompressed layers in place without verifying them: the layer pass below
    # verifies every one of them in full before anything is committed.
    prepared = prepare(
        source, options, platform=platform, transport=src_transport, rules_dirs=rules_dirs, progress=progress,
        header_cache=cache, defer_verification=True, spool=spool,
    )
    image, plan, scan = prepared.image, prepared.plan, prepared.scan
    check_service_secrets(options.service_secrets, plan.service, options.env, extra_secrets, injections)
    timings["analyze"] = time.monotonic() - started
    runtime: Runtime
    if plan.runtime:
        from sconify.image.reference import parse_reference

        runtime = runtime_from_image(open_image(parse_reference(plan.runtime), None, src_transport))
    else:
        runtime = builtin_runtime()

    created = plan.created or "1970-01-01T00:00:00Z"
    mtime = _epoch(created)
    regions = _fs_regions(plan)
    dest = open_destination(destination, dest_transport)
    family = "oci" if "oci" in dest.families else dest.families[0]
    try:
        t0 = time.monotonic()
        builder = LayerBuilder(
            image, scan, regions, fspf_key, plan.chunk_size, dest, family, plan.executable, progress, cache,
            compression=options.layer_compression, checks=prepared.unverified,
            pipelined=sum(1 for a in plan.layers if a.action == "rewrite") < (os.cpu_count() or 1),
        )
        with ThreadPoolExecutor(max_workers=_layer_workers(image, plan)) as pool:
            # The analysis's many small objects live to the end: keep the collector from walking them again
            # while the layers are built (and let it see them afterwards, for long-running workers).
            gc.freeze()
            try:
                # Largest layers first, so that no big layer starts last and runs alone at the end.
                by_size = sorted(plan.layers, key=lambda a: image.layers[a.index].descriptor.size, reverse=True)
                futures = {pool.submit(builder.build, a): a.index for a in by_size}
                # The runtime layer depends on nothing the layers produce: a worker builds it once one is free.
                runtime_layer = pool.submit(
                    _new_layer, dest, family, runtime_layer_entries(runtime, plan.runtime_path, mtime), mtime
                )
                # The enclave is measured as soon as the layer with the program is done, beside the others.
                measuring = None if plan.executable else pool.submit(_measure, runtime, None, plan)
                built: dict[int, LayerOutput] = {}
                for future in as_completed(futures):
                    built[futures[future]] = output = future.result()
                    if measuring is None and output.executable is not None:
                        measuring = pool.submit(_measure, runtime, output.executable, plan)
            finally:
                gc.unfreeze()
            outputs = [built[a.index] for a in plan.layers]
            # Layers the analysis read unverified and the layer pass did not read in full: verify them now.
            unchecked = [o.index for o in outputs if o.index in prepared.unverified and not o.verified]
            list(pool.map(builder.verify_source, unchecked))
        if cache is not None:  # the header scans of the layers now verified are kept for the next conversion
            for index in prepared.unverified:
                cache.put(image.layers[index].descriptor.digest, prepared.headers[index])
        timings["layers"] = time.monotonic() - t0
        if measuring is None:
            raise ConversionError(f"the program {plan.executable} was not found in the layers of {plan.source}.")
        volume = _seal_volume(plan, outputs, regions, fspf_key, mtime)
        runtime_desc, runtime_diff = runtime_layer.result()
        protection_desc, protection_diff = _new_layer(dest, family, list(volume.entries()), mtime)
        measurement, sgxs, timings["measure"] = measuring.result()
        mrenclave = measurement.mrenclave.hex()
        sigstruct = sign(
            SigstructBody.for_enclave(measurement.mrenclave, debug=plan.settings.debug, date=_signing_day(created)),
            enclave_key,
        )

        diff_ids = [o.diff_id for o in outputs] + [runtime_diff, protection_diff]
        config = new_config(image, plan, diff_ids, outputs, created)
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_desc = Descriptor(
            mt.OCI_CONFIG if family == "oci" else mt.DOCKER_CONFIG, sha256_digest(config_bytes), len(config_bytes)
        )
        if not dest.has_blob(config_desc):
            dest.put_blob(config_desc, io.BytesIO(config_bytes))
        layer_descs = [o.descriptor for o in outputs] + [runtime_desc, protection_desc]
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST if family == "oci" else mt.DOCKER_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [d.to_json() for d in layer_descs],
        }
        if family == "oci":
            manifest["annotations"] = {
                "org.opencontainers.image.base.name": plan.source,
                "org.opencontainers.image.base.digest": plan.source_digest,
                f"{ANNOTATION_PREFIX}.version": __version__,
                f"{ANNOTATION_PREFIX}.mrenclave": mrenclave,
            }
        data = manifest_bytes(manifest)
        digest = sha256_digest(data)

        session = _session(plan, mrenclave, volume, extra_secrets, injections, options.service_secrets)
        report = _report(
            plan,
            prepared,
            outputs,
            volume,
            measurement,
            sigstruct,
            digest,
            destination,
            fspf_origin,
            enclave_origin,
            timings,
        )
        report["declared"] = {  # names and paths only: the CAS generates every value
            "secrets": [s["name"] for s in session.secrets],
            "injection_files": [f["path"] for f in session.images[0]["injection_files"]],
            "volumes": options.service_secrets.image_volumes(),
        }
        files = {
            "session.yml": session.to_yaml().encode(),
            "enclave.sig": sigstruct.to_bytes(),
            "report.json": json.dumps(report, indent=2, sort_keys=True).encode() + b"\n",
        }
        if enclave_key_file is None:
            from sconify.enclave.keys import enclave_key_pem

            files["enclave-key.pem"] = enclave_key_pem(enclave_key)
        files["enclave.sgxs"] = sgxs
        chart = ChartSpec(
            name=plan.service,
            repository=destination.name or str(destination.path or "image"),
            tag=destination.tag,
            digest=digest,
            config_id=plan.config_id,
            cas=plan.cas,
            las=None,
            volumes=tuple((v.name, v.path) for v in options.service_secrets.volumes),
        )
        # The policy is staged first and moved into place only once the image is committed: a destination
        # that refuses the manifest leaves neither behind.
        staging = stage_policy_dir(policy_out, files, chart)
        try:
            dest.put_manifest(data, manifest["mediaType"])
            where = dest.commit()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        install_policy_dir(staging, policy_out)
    except BaseException:
        dest.abort()
        raise
    signature = _sign_image(destination, digest, signing_key, dest_transport) if signing_key is not None else None
    timings["total"] = time.monotonic() - started
    return ConvertResult(
        plan=plan,
        destination=where,
        digest=digest,
        mrenclave=mrenclave,
        mrsigner=sigstruct.mrsigner.hex(),
        fspf_tag=volume.tag.hex(),
        policy_dir=str(policy_out),
        signature=signature,
        layers=tuple(
            {"index": o.index, "action": o.action, "digest": o.descriptor.digest, "size": o.descriptor.size}
            for o in outputs
        ),
        timings=timings,
        report=report,
    )


def _measure(runtime: Runtime, executable: bytes | None, plan: Plan) -> tuple[Measurement, bytes, float]:
    """The enclave's measurement, its SGXS stream (checked against it), and the seconds this took."""
    t0 = time.monotonic()
    measurement = measure(
        runtime.data,
        executable,
        plan.settings,
        runtime_name=runtime.origin,
        executable_name=plan.executable or "the executable",
    )
    return measurement, measurement.sgxs_bytes(), time.monotonic() - t0


def _signing_day(created: str) -> dt.date:
    return dt.datetime.fromtimestamp(float(_epoch(created)), dt.UTC).date()


def _report(
    plan: Plan,
    prepared: Prepared,
    outputs: Sequence[LayerOutput],
    volume: VolumeResult,
    measurement: Measurement,
    sigstruct: Any,
    digest: str,
    destination: Reference,
    fspf_origin: str,
    enclave_origin: str,
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "sconify_version": __version__,
        "source": plan.source,
        "source_digest": plan.source_digest,
        "destination": str(destination),
        "digest": digest,
        "platform": plan.platform,
        "config_id": plan.config_id,
        "command": list(plan.argv),
        "executable": plan.executable,
        "regions": [r.to_json() for r in plan.regions],
        "region_stats": [s.__dict__ for s in plan.region_stats],
        "layers": [
            {**a.to_json(), "output_digest": o.descriptor.digest, "output_size": o.descriptor.size,
             "output_media_type": o.descriptor.media_type, "result": o.action}
            for a, o in zip(plan.layers, outputs, strict=True)
        ],
        "protected_files": volume.files,
        "protected_bytes": volume.total_bytes,
        "mrenclave": measurement.mrenclave.hex(),
        "mrsigner": sigstruct.mrsigner.hex(),
        "enclave": plan.settings.to_dict(),
        "fspf_tag": volume.tag.hex(),
        "keys": {"fspf": fspf_origin, "enclave": enclave_origin},
        "relaxations": list(plan.relaxations),
        "moved_to_policy": sorted(k for k, _ in plan.environment),
        "warnings": list(plan.warnings),
        "timings": dict(timings),
    }
