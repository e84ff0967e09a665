"""``sconify fs``: protect a directory tree into an FSPF volume, verify it, decrypt it, show its metadata."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from sconify.cli.progress import progress_for
from sconify.cli.render import emit_fields, emit_json, emit_table
from sconify.errors import UsageError, VerificationFailed
from sconify.fspf import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_METADATA_PATH,
    DirectoryVolume,
    Record,
    RecordKind,
    Region,
    RegionTable,
    VolumeKey,
    parse_tag,
    protect_directory,
    read_key_file,
    write_key_file,
)
from sconify.fspf.format import display_path

_DEFAULT_WORKERS = min(os.cpu_count() or 1, 8)


def _key_options(*, tag: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        if tag:
            f = click.option(
                "--tag",
                "tag_hex",
                envvar="SCONIFY_FSPF_TAG",
                metavar="HEX",
                help="The expected volume tag (32 hex digits) from the policy; also $SCONIFY_FSPF_TAG.",
            )(f)
        f = click.option(
            "--key-file",
            type=click.Path(dir_okay=False),
            help="A file with the key (and tag), as written by `fs protect --keys-out`, or the key in hex.",
        )(f)
        f = click.option(
            "--key",
            "key_hex",
            envvar="SCONIFY_FSPF_KEY",
            metavar="HEX",
            help="The volume key (64 hex digits); also $SCONIFY_FSPF_KEY, which keeps it out of `ps`.",
        )(f)
        return f

    return decorate


def _metadata_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--metadata-path",
        default=DEFAULT_METADATA_PATH.decode(),
        show_default=True,
        help="Where the metadata file lies inside the volume.",
    )(f)


def _workers_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--workers",
        "-j",
        type=click.IntRange(min=1),
        default=_DEFAULT_WORKERS,
        show_default=True,
        help="Worker threads for sealing and verifying.",
    )(f)


def _load_key(key_hex: str | None, key_file: str | None, *, required: bool) -> tuple[VolumeKey | None, bytes | None]:
    """The key (and a tag from a key file) from --key or --key-file."""
    if key_hex and key_file:
        raise UsageError("Give the key either with --key or with --key-file, not both.")
    if key_file:
        loaded = read_key_file(key_file)
        return loaded.key, loaded.tag
    if key_hex:
        return VolumeKey.from_hex(key_hex), None
    if required:
        raise UsageError("This command needs the volume key; give --key HEX, --key-file FILE or $SCONIFY_FSPF_KEY.")
    return None, None


def _load_key_and_tag(key_hex: str | None, key_file: str | None, tag_hex: str | None) -> tuple[VolumeKey, bytes]:
    key, file_tag = _load_key(key_hex, key_file, required=True)
    assert key is not None
    tag = parse_tag(tag_hex) if tag_hex else file_tag
    if tag is None:
        raise UsageError(
            "This command needs the expected volume tag, which names the exact state to accept; give --tag HEX "
            "or a key file that holds it."
        )
    return key, tag


@click.group("fs")
def fs() -> None:
    """Protect directory trees with the file-system protection layer (FSPF), and check them.

    A volume keeps every file at its path; files in encrypted regions are stored encrypted, files in
    authenticated regions stay readable, and both are checked against the metadata, whose tag (with
    the key) goes into the policy. The format is described in docs/fspf.md.
    """


@fs.command("protect")
@click.argument("src_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--region",
    "regions",
    multiple=True,
    metavar="MODE:PREFIX",
    help="A region, e.g. encrypted:/app or authenticated:/usr/lib (repeatable; the longest prefix wins; "
    "/ is not-protected unless given).",
)
@_key_options(tag=False)
@click.option(
    "--keys-out",
    type=click.Path(dir_okay=False),
    help="Write key and tag as JSON to this file (mode 0600) instead of printing the key.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Chunk size in bytes: a power of two from 4096 to 16777216.",
)
@_metadata_option
@_workers_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with the key and tag.")
@click.pass_context
def protect(
    ctx: click.Context,
    src_dir: str,
    out_dir: str,
    regions: tuple[str, ...],
    key_hex: str | None,
    key_file: str | None,
    keys_out: str | None,
    chunk_size: int,
    metadata_path: str,
    workers: int,
    as_json: bool,
) -> None:
    """Protect the tree SRC_DIR into the new directory OUT_DIR and print the volume key and tag.

    Without --key or --key-file a random key is made; with the same key the same tree gives the same
    bytes. Keep the key secret: it goes into the policy, never into an image.
    """
    table = RegionTable.of(Region.parse(r) for r in regions)
    if not table.protects_anything:
        raise UsageError("No region is encrypted or authenticated; give e.g. --region encrypted:/app.")
    key, _ = _load_key(key_hex, key_file, required=False)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    result = protect_directory(
        src_dir,
        out_dir,
        table,
        key,
        chunk_size=chunk_size,
        metadata_path=metadata_path,
        metadata_mtime=mtime,
        workers=workers,
        progress=progress_for(ctx),
    )
    if keys_out:
        write_key_file(keys_out, result.key, result.tag)
    summary: dict[str, Any] = {
        "tag": result.tag.hex(),
        "files": result.files,
        "bytes": result.total_bytes,
        "metadata_path": display_path(result.metadata_path),
    }
    if keys_out:
        summary["keys_file"] = keys_out
    else:
        summary["key"] = result.key.hex()
    if as_json:
        emit_json(summary)
        return
    fields = [("key", summary["key"])] if "key" in summary else [("keys", f"written to {keys_out}")]
    fields += [("tag", summary["tag"]), ("files", result.files), ("bytes", result.total_bytes)]
    emit_fields(fields)


@fs.command("verify")
@click.argument("directory", type=click.Path(file_okay=False))
@_key_options(tag=True)
@_metadata_option
@_workers_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(
    ctx: click.Context,
    directory: str,
    key_hex: str | None,
    key_file: str | None,
    tag_hex: str | None,
    metadata_path: str,
    workers: int,
    as_json: bool,
) -> None:
    """Check every protected path of the volume in DIRECTORY against the key and the expected tag.

    Exits with 13 and lists each failing path and what is wrong with it when anything differs.
    """
    key, tag = _load_key_and_tag(key_hex, key_file, tag_hex)
    with DirectoryVolume(directory, key, tag, metadata_path=metadata_path) as volume:
        report = volume.verify(workers=workers, progress=progress_for(ctx))
    if as_json:
        emit_json(
            {
                "ok": report.ok,
                "tag": report.tag.hex(),
                "records": report.records,
                "files": report.files,
                "bytes": report.total_bytes,
                "problems": [
                    {"path": os.fsdecode(p.path), "kind": p.kind.value, "detail": p.detail} for p in report.problems
                ],
            }
        )
    elif report.ok:
        emit_fields(
            [("verified", "ok"), ("tag", report.tag.hex()), ("files", report.files), ("bytes", report.total_bytes)]
        )
    else:
        emit_table(
            ["path", "problem", "detail"], [(display_path(p.path), p.kind.value, p.detail) for p in report.problems]
        )
    if not report.ok:
        raise VerificationFailed(f"The volume {directory} does not verify: {report.failure()}.")


@fs.command("decrypt")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@_key_options(tag=True)
@_metadata_option
@_workers_option
@click.pass_context
def decrypt(
    ctx: click.Context,
    directory: str,
    out_dir: str,
    key_hex: str | None,
    key_file: str | None,
    tag_hex: str | None,
    metadata_path: str,
    workers: int,
) -> None:
    """Verify the volume in DIRECTORY and write its plaintext tree to the new directory OUT_DIR.

    Not-protected paths are copied as they are. Nothing is written if any check fails.
    """
    key, tag = _load_key_and_tag(key_hex, key_file, tag_hex)
    with DirectoryVolume(directory, key, tag, metadata_path=metadata_path) as volume:
        report = volume.decrypt_to(out_dir, workers=workers, progress=progress_for(ctx))
    emit_fields(
        [("decrypted", out_dir), ("tag", report.tag.hex()), ("files", report.files), ("bytes", report.total_bytes)]
    )


def _record_row(record: Record, chunk_size: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": os.fsdecode(record.path),
        "kind": record.kind.label,
        "protection": record.protection.label,
        "mode": f"{record.st_mode & 0o7777:04o}",
        "uid": record.uid,
        "gid": record.gid,
        "mtime_ns": record.mtime_ns,
    }
    if record.kind is RecordKind.FILE:
        row["size"] = record.size
        row["chunks"] = record.chunk_count(chunk_size)
    if record.kind in (RecordKind.SYMLINK, RecordKind.HARDLINK):
        row["target"] = os.fsdecode(record.target)
    if record.xattrs:
        row["xattrs"] = [os.fsdecode(name) for name, _ in record.xattrs]
    return row


@fs.command("show")
@click.argument("directory", type=click.Path(file_okay=False))
@_key_options(tag=False)
@_metadata_option
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def show(directory: str, key_hex: str | None, key_file: str | None, metadata_path: str, as_json: bool) -> None:
    """Show the metadata of the volume in DIRECTORY: format, regions and every protected path.

    Only the key is needed; the tag shown is the one the metadata carries (compare it with the policy).
    """
    key, _ = _load_key(key_hex, key_file, required=True)
    assert key is not None
    with DirectoryVolume(directory, key, None, metadata_path=metadata_path) as opened:
        volume = opened.volume
    header = volume.header
    regions = [{"prefix": os.fsdecode(r.prefix), "mode": r.mode.label} for r in volume.regions.regions]
    rows = [_record_row(r, header.chunk_size) for r in volume.records]
    if as_json:
        emit_json(
            {
                "format_version": header.version,
                "cipher_suite": header.suite,
                "chunk_size": header.chunk_size,
                "key_id": header.key_id.hex(),
                "tag": volume.tag.hex(),
                "regions": regions,
                "records": rows,
            }
        )
        return
    emit_fields(
        [
            ("format", f"FSPF {header.version}, cipher suite {header.suite}"),
            ("chunk size", header.chunk_size),
            ("tag", volume.tag.hex()),
            ("regions", ", ".join(f"{r['mode']}:{r['prefix']}" for r in regions)),
            ("files", f"{volume.files} ({volume.protected_bytes} bytes)"),
        ]
    )
    click.echo()
    emit_table(
        ["path", "kind", "protection", "size", "mode", "uid", "gid", "mtime", "target"],
        [
            (
                display_path(r.path),
                r.kind.label,
                r.protection.label,
                r.size if r.kind is RecordKind.FILE else "",
                f"{r.st_mode & 0o7777:04o}",
                r.uid,
                r.gid,
                datetime.fromtimestamp(r.mtime_ns // 1_000_000_000, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                display_path(r.target) if r.target else "",
            )
            for r in volume.records
        ],
    )
