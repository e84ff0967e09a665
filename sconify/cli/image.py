"""``sconify copy`` and ``sconify inspect``: move and look at images over any transport."""

from __future__ import annotations

import json
from typing import Any

import click

from sconify.cli.options import make_transport_options, parse_platform, platform_option, transport_options
from sconify.cli.progress import progress_for
from sconify.cli.render import emit_fields, emit_json, emit_table
from sconify.image.copy import write_image
from sconify.image.model import Image
from sconify.image.reference import parse_reference
from sconify.image.transports import open_destination, open_image


@click.command()
@click.argument("source", metavar="SRC")
@click.argument("destination", metavar="DST")
@platform_option
@transport_options("src-")
@transport_options("dest-")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def copy(
    ctx: click.Context,
    source: str,
    destination: str,
    platform: str | None,
    src_creds: str | None,
    src_authfile: str | None,
    src_tls_verify: bool | None,
    src_daemon_host: str | None,
    src_cert_dir: str | None,
    dest_creds: str | None,
    dest_authfile: str | None,
    dest_tls_verify: bool | None,
    dest_daemon_host: str | None,
    dest_cert_dir: str | None,
    as_json: bool,
) -> None:
    """Copy an image from SRC to DST (any transport to any transport), keeping digests where the format allows.

    References use skopeo's syntax: docker://HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG], oci-archive:FILE[:TAG],
    docker-archive:FILE[:NAME:TAG], docker-daemon:NAME[:TAG]; a bare NAME:TAG means docker://.
    """
    src_ref, dst_ref = parse_reference(source), parse_reference(destination)
    image = open_image(
        src_ref,
        parse_platform(platform),
        make_transport_options(src_creds, src_authfile, src_tls_verify, src_daemon_host, src_cert_dir),
    )
    dest = open_destination(
        dst_ref, make_transport_options(dest_creds, dest_authfile, dest_tls_verify, dest_daemon_host, dest_cert_dir)
    )
    result = write_image(image, dest, progress_for(ctx))
    if as_json:
        emit_json(result.to_json())
        return
    emit_fields(
        [
            ("copied", result.source),
            ("to", result.destination),
            ("digest", result.digest),
            ("layers", ", ".join(f"{c.action}" for c in result.layers) or "none"),
        ]
    )


def summary(image: Image) -> dict[str, Any]:
    """The facts of an image a person asks for first, as plain data."""
    cfg = image.config.get("config") or {}
    return {
        "name": image.name,
        "digest": image.digest,
        "media_type": image.media_type,
        "platform": str(image.platform),
        "created": image.config.get("created"),
        "config_digest": image.config_descriptor.digest,
        "entrypoint": cfg.get("Entrypoint"),
        "cmd": cfg.get("Cmd"),
        "env": cfg.get("Env") or [],
        "user": cfg.get("User") or "",
        "working_dir": cfg.get("WorkingDir") or "",
        "labels": cfg.get("Labels") or {},
        "annotations": image.annotations,
        "layers": [
            {
                "digest": layer.descriptor.digest,
                "size": layer.descriptor.size,
                "media_type": layer.descriptor.media_type,
                "diff_id": layer.diff_id,
            }
            for layer in image.layers
        ],
    }


@click.command()
@click.argument("reference", metavar="REF")
@click.option("--raw", is_flag=True, help="Print the exact manifest bytes (with --config: the config bytes).")
@click.option("--config", "show_config", is_flag=True, help="Print the image config instead of the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@platform_option
@transport_options()
def inspect(
    reference: str,
    raw: bool,
    show_config: bool,
    as_json: bool,
    platform: str | None,
    creds: str | None,
    authfile: str | None,
    tls_verify: bool | None,
    daemon_host: str | None,
    cert_dir: str | None,
) -> None:
    """Show an image: its digest, platform, command, environment and layers."""
    image = open_image(
        parse_reference(reference),
        parse_platform(platform),
        make_transport_options(creds, authfile, tls_verify, daemon_host, cert_dir),
    )
    if raw:
        data = image.config_bytes if show_config else image.manifest_bytes
        click.echo(data.decode("utf-8", "replace"), nl=False)
        return
    if show_config:
        click.echo(json.dumps(image.config, indent=2, sort_keys=True))
        return
    info = summary(image)
    if as_json:
        emit_json(info)
        return
    emit_fields(
        [
            ("name", info["name"]),
            ("digest", info["digest"]),
            ("media type", info["media_type"]),
            ("platform", info["platform"]),
            ("created", info["created"]),
            ("entrypoint", json.dumps(info["entrypoint"])),
            ("cmd", json.dumps(info["cmd"])),
            ("user", info["user"] or "(root)"),
            ("workdir", info["working_dir"] or "/"),
        ]
    )
    for env in info["env"]:
        emit_fields([("env", env)])
    click.echo()
    emit_table(
        ["digest", "size", "media type"], [(la["digest"], la["size"], la["media_type"]) for la in info["layers"]]
    )
