"""``sconify enclave``: measure an enclave (MRENCLAVE, SGXS), sign it (SIGSTRUCT), show and verify signatures."""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

from sconify.cli.render import emit_fields, emit_json, emit_table
from sconify.enclave._files import open_input, read_input, write_atomic
from sconify.enclave.keys import load_enclave_key, load_enclave_public_key, read_passphrase
from sconify.enclave.measurement import Measurement, measure
from sconify.enclave.settings import EnclaveSettings, format_size
from sconify.enclave.sgxs import SgxsSummary, parse_sgxs
from sconify.enclave.sigstruct import (
    Sigstruct,
    SigstructBody,
    attach_signature,
    sign,
    signing_date,
)
from sconify.errors import UsageError, VerificationFailed

F = TypeVar("F", bound=Callable[..., Any])

_FILE = click.Path(dir_okay=False, path_type=Path)
# Streams shorter than this are written or read in well under a second: no progress bar for them.
_PROGRESS_MIN_BYTES = 256 << 20


def _progress_bar(total: int, desc: str) -> tqdm:
    """A progress bar on stderr for long SGXS reads and writes; silent with -q or for small streams."""
    root = click.get_current_context().find_root()
    quiet = bool((root.obj or {}).get("quiet"))
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=quiet or total < _PROGRESS_MIN_BYTES, leave=False)


def _parse_sgxs_file(path: Path) -> SgxsSummary:
    with open_input(path, "SGXS file") as stream, _progress_bar(path.stat().st_size, f"reading {path}") as bar:
        wrapped = CallbackIOWrapper(bar.update, stream, "read")
        return parse_sgxs(wrapped, f"SGXS file {path}")  # type: ignore[arg-type]


def _source_options(with_precomputed: bool) -> Callable[[F], F]:
    """The options that say which enclave: an image, or runtime and executable files, plus settings."""

    def decorate(f: F) -> F:
        options = [
            click.option("--image", "image_ref", metavar="REF",
                         help="Measure the program of this image (needs the image reader; not available yet)."),
            click.option("--runtime", type=_FILE, metavar="FILE", help="The enclave runtime (an x86-64 ELF)."),
            click.option("--executable", type=_FILE, metavar="FILE",
                         help="The program's ELF measured into the enclave (for a script: its interpreter)."),
            click.option("--heap", metavar="SIZE", help="Enclave heap, such as 64M or 1G  [default: 64M]."),
            click.option("--stack", metavar="SIZE", help="Stack per thread, such as 1M  [default: 1M]."),
            click.option("--threads", type=int, metavar="N", help="Enclave threads  [default: 8]."),
            click.option("--dlopen", metavar="MODE",
                         help="Loading libraries after start: off, protected or unprotected "
                              "(SCONE_ALLOW_DLOPEN 0, 1, 2)  [default: off]."),
            click.option("--debug", is_flag=True,
                         help="A debug enclave (debuggers can read it); never for production."),
        ]
        if with_precomputed:
            options += [
                click.option("--sgxs", "sgxs_in", type=_FILE, metavar="FILE",
                             help="Take MRENCLAVE from this SGXS stream instead of measuring."),
                click.option("--mrenclave", "mrenclave_hex", metavar="HEX",
                             help="Take this MRENCLAVE (64 hex digits) instead of measuring."),
            ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _signing_options(f: F) -> F:
    options = [
        click.option("--date", "date_text", metavar="YYYYMMDD",
                     help="Signing date in the SIGSTRUCT  [default: from SOURCE_DATE_EPOCH, else today]."),
        click.option("--isvprodid", type=int, default=0, show_default=True, help="ISV product id (0..65535)."),
        click.option("--isvsvn", type=int, default=0, show_default=True, help="ISV security version (0..65535)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@dataclass(frozen=True)
class _Enclave:
    """Which enclave a command is about: its MRENCLAVE, debug flag and, when measured here, the measurement."""

    mrenclave: bytes
    debug: bool
    measurement: Measurement | None


def _settings(heap: str | None, stack: str | None, threads: int | None, dlopen: str | None,
              debug: bool) -> EnclaveSettings:
    return EnclaveSettings.from_options(heap=heap, stack=stack, threads=threads, dlopen=dlopen, debug=debug)


def _resolve(
    image_ref: str | None,
    runtime: Path | None,
    executable: Path | None,
    heap: str | None,
    stack: str | None,
    threads: int | None,
    dlopen: str | None,
    debug: bool,
    sgxs_in: Path | None = None,
    mrenclave_hex: str | None = None,
    precomputed: bool = True,
) -> _Enclave:
    """Measure the enclave the options describe, or take its MRENCLAVE from --sgxs or --mrenclave."""
    sources = [name for name, value in (("--image", image_ref), ("--runtime", runtime), ("--sgxs", sgxs_in),
                                        ("--mrenclave", mrenclave_hex)) if value is not None]
    if len(sources) > 1:
        raise UsageError(f"{' and '.join(sources)} both say which enclave; give only one of them.")
    if executable is not None and runtime is None:
        raise UsageError("--executable needs --runtime FILE too: the enclave holds the runtime and the program.")
    if image_ref is not None:
        raise UsageError(
            "--image is not available yet (the image reader is still being written); "
            "measure with --runtime FILE --executable FILE instead."
        )
    if not sources:
        alternatives = " (or --sgxs FILE, --mrenclave HEX)" if precomputed else ""
        raise UsageError(f"say which enclave: --runtime FILE [--executable FILE]{alternatives}.")
    if runtime is not None:
        settings = _settings(heap, stack, threads, dlopen, debug)
        runtime_bytes = read_input(runtime, "runtime file")
        executable_bytes = read_input(executable, "executable file") if executable is not None else None
        m = measure(runtime_bytes, executable_bytes, settings, runtime_name=f"runtime file {runtime}",
                    executable_name=f"executable file {executable}")
        return _Enclave(m.mrenclave, settings.debug, m)
    given = [name for name, value in (("--heap", heap), ("--stack", stack), ("--threads", threads),
                                      ("--dlopen", dlopen)) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} only apply when measuring --runtime FILE; "
                         f"the MRENCLAVE given already includes the settings.")
    if sgxs_in is not None:
        return _Enclave(_parse_sgxs_file(sgxs_in).mrenclave, debug, None)
    assert mrenclave_hex is not None
    return _Enclave(_parse_mrenclave(mrenclave_hex), debug, None)


def _parse_mrenclave(text: str) -> bytes:
    try:
        value = bytes.fromhex(text.strip())
    except ValueError:
        value = b""
    if len(value) != 32:
        raise UsageError(f"MRENCLAVE '{text}' is not 64 hex digits; copy it from `sconify enclave measure`.")
    return value


def _render_measurement(m: Measurement, as_json: bool, sgxs_out: Path | None) -> None:
    if as_json:
        out = m.to_dict()
        out["sgxs"] = str(sgxs_out) if sgxs_out is not None else None
        emit_json(out)
        return
    fields = m.summary_fields()
    if sgxs_out is not None:
        fields.append(("sgxs", f"{sgxs_out} ({m.layout.sgxs_length} bytes)"))
    emit_fields(fields)
    click.echo()
    emit_table(
        ["region", "offset", "size", "pages", "measured"],
        [(r.name, f"{r.offset:#x}", format_size(r.size), r.pages, r.measured_pages) for r in m.layout.regions()],
    )


def _render_sigstruct(sig: Sigstruct, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    info = sig.to_dict()
    info.update(extra or {})
    if as_json:
        emit_json(info)
        return
    emit_fields([
        ("mrenclave", info["mrenclave"]),
        ("mrsigner", info["mrsigner"]),
        ("attributes", f"{info['attributes']} (xfrm {info['xfrm']})"),
        ("attribute mask", f"{info['attributes_mask']} (xfrm {info['xfrm_mask']})"),
        ("debug", "yes" if info["debug"] else "no"),
        ("isvprodid", info["isvprodid"]),
        ("isvsvn", info["isvsvn"]),
        ("date", info["date"]),
        ("vendor", info["vendor"]),
        ("signature", "valid" if info["signature_valid"] else "INVALID"),
        *[(k, v) for k, v in (extra or {}).items()],
    ])


def _read_sigstruct(path: Path) -> Sigstruct:
    return Sigstruct.from_bytes(read_input(path, "SIGSTRUCT file"), f"SIGSTRUCT file {path}")


@click.group()
def enclave() -> None:
    """Measure enclaves (MRENCLAVE, SGXS) and sign them (SIGSTRUCT)."""


@enclave.command("measure")
@_source_options(with_precomputed=False)
@click.option("--sgxs", "sgxs_out", type=_FILE, metavar="OUT", help="Also write the canonical SGXS stream here.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (field mrenclave as hex).")
def measure_command(image_ref: str | None, runtime: Path | None, executable: Path | None, heap: str | None,
                    stack: str | None, threads: int | None, dlopen: str | None, debug: bool,
                    sgxs_out: Path | None, as_json: bool) -> None:
    """Print MRENCLAVE and the layout of the enclave for a runtime, a program and settings."""
    target = _resolve(image_ref, runtime, executable, heap, stack, threads, dlopen, debug, precomputed=False)
    assert target.measurement is not None
    if sgxs_out is not None:
        with _progress_bar(target.measurement.layout.sgxs_length, f"writing {sgxs_out}") as bar:
            target.measurement.write_sgxs(sgxs_out, bar.update)
    _render_measurement(target.measurement, as_json, sgxs_out)


@enclave.command("sign")
@_source_options(with_precomputed=True)
@click.option("--key", "key_path", type=_FILE, required=True, metavar="KEY.pem",
              help="Enclave signing key: RSA-3072, exponent 3, PEM (PKCS#1 or PKCS#8).")
@click.option("--passphrase-file", type=_FILE, metavar="FILE",
              help="File whose first line is the key's passphrase  [default: $SCONIFY_ENCLAVE_KEY_PASSPHRASE].")
@_signing_options
@click.option("--out", "out", type=_FILE, required=True, metavar="SIGFILE", help="Where to write the SIGSTRUCT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (fields mrenclave, mrsigner as hex).")
def sign_command(image_ref: str | None, runtime: Path | None, executable: Path | None, heap: str | None,
                 stack: str | None, threads: int | None, dlopen: str | None, debug: bool, sgxs_in: Path | None,
                 mrenclave_hex: str | None, key_path: Path, passphrase_file: Path | None, date_text: str | None,
                 isvprodid: int, isvsvn: int, out: Path, as_json: bool) -> None:
    """Sign an enclave: write its SIGSTRUCT (RSA-3072, exponent 3, with Q1 and Q2)."""
    key = load_enclave_key(key_path, read_passphrase(passphrase_file))  # before measuring: fail fast
    target = _resolve(image_ref, runtime, executable, heap, stack, threads, dlopen, debug, sgxs_in, mrenclave_hex)
    body = SigstructBody.for_enclave(target.mrenclave, target.debug, signing_date(date_text), isvprodid, isvsvn)
    sig = sign(body, key)
    write_atomic(out, [sig.to_bytes()], what="SIGSTRUCT file")
    _render_sigstruct(sig, as_json, {"sigstruct": str(out)})


@enclave.command("show")
@click.argument("sigfile", type=_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (fields mrenclave, mrsigner as hex).")
def show_command(sigfile: Path, as_json: bool) -> None:
    """Print what a SIGSTRUCT says: MRENCLAVE, MRSIGNER, attributes, debug, product id, SVN, date."""
    _render_sigstruct(_read_sigstruct(sigfile), as_json)


@enclave.command("verify")
@click.argument("sigfile", type=_FILE)
@click.option("--sgxs", "sgxs_in", type=_FILE, metavar="FILE",
              help="Also check that this SGXS stream hashes to the signed MRENCLAVE.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with the findings.")
def verify_command(sigfile: Path, sgxs_in: Path | None, as_json: bool) -> None:
    """Exit 0 only if the SIGSTRUCT's signature, Q1 and Q2 hold (and the SGXS stream matches it)."""
    sig = _read_sigstruct(sigfile)
    problems = sig.problems()
    result: dict[str, Any] = {"mrenclave": sig.mrenclave.hex(), "mrsigner": sig.mrsigner.hex(),
                              "signature_valid": not problems}
    if sgxs_in is not None:
        summary = _parse_sgxs_file(sgxs_in)
        result["sgxs_mrenclave"] = summary.mrenclave.hex()
        result["sgxs_matches"] = summary.mrenclave == sig.mrenclave
        if summary.mrenclave != sig.mrenclave:
            problems.append(f"SGXS file {sgxs_in} hashes to {summary.mrenclave.hex()}, "
                            f"not the signed MRENCLAVE {sig.mrenclave.hex()}")
    result["valid"] = not problems
    if as_json:
        emit_json(result)
    if problems:
        raise VerificationFailed(f"SIGSTRUCT file {sigfile} does not hold: {'; '.join(problems)}.")
    if not as_json:
        emit_fields([("mrenclave", result["mrenclave"]), ("mrsigner", result["mrsigner"]),
                     ("signature", "valid"), *([("sgxs", "matches")] if sgxs_in is not None else [])])


@enclave.command("export-signing-data")
@_source_options(with_precomputed=True)
@_signing_options
@click.option("--out", "out", type=_FILE, required=True, metavar="FILE",
              help="Where to write the 256 bytes to sign (SIGSTRUCT header and body).")
@click.option("--digest-out", type=_FILE, metavar="FILE",
              help="Also write their SHA-256 digest (32 bytes) for signers that take a digest.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def export_signing_data_command(image_ref: str | None, runtime: Path | None, executable: Path | None,
                                heap: str | None, stack: str | None, threads: int | None, dlopen: str | None,
                                debug: bool, sgxs_in: Path | None, mrenclave_hex: str | None,
                                date_text: str | None, isvprodid: int, isvsvn: int, out: Path,
                                digest_out: Path | None, as_json: bool) -> None:
    """Step 1 of signing with a key held elsewhere (an HSM): write the bytes to sign."""
    target = _resolve(image_ref, runtime, executable, heap, stack, threads, dlopen, debug, sgxs_in, mrenclave_hex)
    body = SigstructBody.for_enclave(target.mrenclave, target.debug, signing_date(date_text), isvprodid, isvsvn)
    write_atomic(out, [body.signing_data()], what="signing data file")
    if digest_out is not None:
        write_atomic(digest_out, [body.signing_digest()], what="digest file")
    info = {
        "mrenclave": target.mrenclave.hex(),
        "signing_data": str(out),
        "digest": body.signing_digest().hex(),
        "digest_file": str(digest_out) if digest_out is not None else None,
    }
    if as_json:
        emit_json(info)
        return
    emit_fields([("mrenclave", info["mrenclave"]), ("signing data", out), ("sha256", info["digest"])])
    click.echo(
        f"\nSign it with PKCS#1 v1.5 and SHA-256 under the enclave key, for example\n"
        f"  openssl dgst -sha256 -sign key.pem -out signature.bin {out}\n"
        f"then: sconify enclave import-signature --data {out} --signature signature.bin "
        f"--public-key public.pem --out enclave.sig"
    )


def _read_signature(path: Path) -> bytes:
    """A detached signature: 384 raw bytes, or the same as hex or base64 text (whitespace ignored)."""
    raw = read_input(path, "signature file")
    if len(raw) == 384:
        return raw
    text = b"".join(raw.split())
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return raw


@enclave.command("import-signature")
@click.option("--data", "data_path", type=_FILE, required=True, metavar="FILE",
              help="The signing data written by export-signing-data.")
@click.option("--signature", "signature_path", type=_FILE, required=True, metavar="FILE",
              help="The RSA signature over it: 384 bytes (big-endian, as openssl writes it), hex or base64.")
@click.option("--public-key", "public_key_path", type=_FILE, required=True, metavar="PEM",
              help="The signer's public key (PEM; a private key file works too).")
@click.option("--passphrase-file", type=_FILE, metavar="FILE",
              help="Passphrase for --public-key if it is an encrypted private key.")
@click.option("--out", "out", type=_FILE, required=True, metavar="SIGFILE", help="Where to write the SIGSTRUCT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (fields mrenclave, mrsigner as hex).")
def import_signature_command(data_path: Path, signature_path: Path, public_key_path: Path,
                             passphrase_file: Path | None, out: Path, as_json: bool) -> None:
    """Step 2 of signing with a key held elsewhere: check the signature, add Q1 and Q2, write the SIGSTRUCT."""
    body = SigstructBody.from_signing_data(read_input(data_path, "signing data file"),
                                           f"signing data file {data_path}")
    public_key = load_enclave_public_key(public_key_path, read_passphrase(passphrase_file))
    sig = attach_signature(body, public_key, _read_signature(signature_path), f"signature file {signature_path}")
    write_atomic(out, [sig.to_bytes()], what="SIGSTRUCT file")
    _render_sigstruct(sig, as_json, {"sigstruct": str(out)})
