"""``sconify convert`` and ``sconify verify``: make a confidential image and its policy, and check one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sconify.cli.options import make_transport_options, parse_platform, platform_option, transport_options
from sconify.cli.progress import progress_for
from sconify.cli.render import emit_fields, emit_json, emit_table
from sconify.image.reference import parse_reference
from sconify.plan import DEFAULT_CAS, DEFAULT_LAS, ConvertOptions, options_from_flags

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)


def _options(kw: dict[str, Any]) -> ConvertOptions:
    return options_from_flags({**kw, "session": kw["name"]})


@click.command()
@click.argument("source", metavar="SRC")
@click.argument("destination", metavar="DST", required=False)
@click.option("--policy-out", type=_DIR, default=Path("policy"), show_default=True,
              help="Directory for session.yml, the enclave signature and SGXS, report.json and the Helm chart (0700).")
@click.option("--enclave-key", type=_FILE, help="RSA-3072 (e=3) enclave signing key; default: a new one, saved "
              "in the policy directory.")
@click.option("--sign-key", type=_FILE, help="ECDSA P-256 key to sign the image in cosign's format.")
@click.option("--fspf-key", type=_FILE, help="File with the volume key as 64 hex digits (default: a fresh key).")
@click.option("--encrypt", multiple=True, metavar="PATH", help="Encrypt this path (repeatable).")
@click.option("--authenticate", multiple=True, metavar="PATH", help="Authenticate this path (repeatable).")
@click.option("--plain", multiple=True, metavar="PATH", help="Leave this path unprotected (repeatable).")
@click.option("--rules", "rules_dirs", multiple=True, type=_DIR, metavar="DIR", help="Extra rule directory.")
@click.option("--heap", help="Enclave heap size, e.g. 1G.")
@click.option("--stack", help="Enclave stack size per thread, e.g. 1M.")
@click.option("--threads", type=int, help="Enclave threads.")
@click.option("--dlopen", type=click.Choice(["off", "protected", "unprotected"]), help="What may be loaded later.")
@click.option("--env", multiple=True, metavar="NAME=VALUE", help="Add or override a variable in the policy.")
@click.option("--command", multiple=True, metavar="ARG", help="The command to run instead of the image's "
              "(one shell-quoted string, or repeat for each argument).")
@click.option("--runtime", metavar="REF", help="A SCONE runtime image (default: the built-in open runtime).")
@click.option("--name", help="Session name (default: the image's repository name).")
@click.option("--namespace", help="Session namespace.")
@click.option("--service", help="Service name in the session (default: the image's repository name).")
@click.option("--cas", default=DEFAULT_CAS, show_default=True, help="CAS address.")
@click.option("--las", default=DEFAULT_LAS, show_default=True, help="LAS address.")
@click.option("--allow-debug", is_flag=True, help="Allow a debug enclave (a relaxation listed in the report).")
@click.option("--secrets", "secrets_file", type=_FILE, help="YAML list of extra session secrets.")
@click.option("--inject", "inject_file", type=_FILE, help="YAML list of injection files for the image.")
@click.option("--secret", multiple=True, metavar="NAME=KIND[:PARAMS]",
              help="A secret the CAS generates (ascii, binary, private-key, x509, x509-ca; e.g. "
              "db_password=ascii:size=24); use it with --env NAME=$$SCONE::db_password$$ (repeatable).")
@click.option("--tls-server", multiple=True, metavar="CERT,KEY[,san=dns:NAME,...]",
              help="Inject a server certificate and key issued by the application's CA at these paths.")
@click.option("--tls-client", multiple=True, metavar="CERT,KEY",
              help="Inject a client certificate and key issued by the application's CA at these paths.")
@click.option("--tls-ca", multiple=True, metavar="PATH", help="Inject the application's CA certificate at PATH.")
@click.option("--volume", multiple=True, metavar="NAME:/PATH",
              help="An encrypted volume at /PATH whose key the CAS generates; a PVC in the chart (repeatable).")
@click.option("--layer-compression", type=click.Choice(["auto", "gzip", "none"]), default="auto", show_default=True,
              help="How rewritten layers are stored: auto keeps a layer that is mostly ciphertext uncompressed "
              "(it cannot shrink) and gzips the others with ciphertext in stored blocks.")
@click.option("--cache", "cache_dir", type=_DIR, envvar="SCONIFY_CACHE", metavar="DIR",
              help="Keep per-layer work here and reuse it (default: $SCONIFY_CACHE; none when unset).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (or plan) as JSON.")
@platform_option
@transport_options("src-")
@transport_options("dest-")
@click.pass_context
def convert(ctx: click.Context, source: str, destination: str | None, **kw: Any) -> None:
    """Convert the native image SRC into a confidential image DST, with its CAS policy.

    \b
    Example:
      sconify convert docker://registry.example/vendor/app:1.4 \\
          docker://registry.example/confidential/app:1.4 \\
          --policy-out out/ --enclave-key enclave.pem --sign-key cosign.key
    """
    from sconify.build.cache import LayerCache
    from sconify.convert import convert as run_convert
    from sconify.convert import prepare
    from sconify.errors import UsageError

    options = _options(kw)
    src = parse_reference(source)
    src_t = make_transport_options(
        kw["src_creds"], kw["src_authfile"], kw["src_tls_verify"], kw["src_daemon_host"], kw["src_cert_dir"]
    )
    dst_t = make_transport_options(
        kw["dest_creds"], kw["dest_authfile"], kw["dest_tls_verify"], kw["dest_daemon_host"], kw["dest_cert_dir"]
    )
    progress = progress_for(ctx)
    if kw["dry_run"]:
        prepared = prepare(src, options, platform=parse_platform(kw["platform"]), transport=src_t,
                           rules_dirs=kw["rules_dirs"], progress=progress)
        plan = prepared.plan
        if kw["as_json"]:
            emit_json(plan.to_json())
            return
        _render_plan(plan)
        return
    if destination is None:
        raise UsageError("give the destination DST (or --dry-run to only print the plan).")
    result = run_convert(
        src,
        parse_reference(destination),
        options,
        policy_out=kw["policy_out"],
        fspf_key_file=kw["fspf_key"],
        enclave_key_file=kw["enclave_key"],
        sign_key_file=kw["sign_key"],
        secrets_file=kw["secrets_file"],
        inject_file=kw["inject_file"],
        platform=parse_platform(kw["platform"]),
        src_transport=src_t,
        dest_transport=dst_t,
        rules_dirs=kw["rules_dirs"],
        progress=progress,
        cache=LayerCache(kw["cache_dir"]) if kw["cache_dir"] else None,
    )
    if kw["as_json"]:
        emit_json(result.to_json())
        return
    emit_fields([
        ("converted", result.plan.source),
        ("to", result.destination),
        ("digest", result.digest),
        ("mrenclave", result.mrenclave),
        ("mrsigner", result.mrsigner),
        ("config id", result.plan.config_id),
        ("policy", f"{result.policy_dir}/session.yml"),
        ("signature", result.signature or "(not signed: give --sign-key)"),
    ])


def _render_plan(plan: Any) -> None:
    data = plan.to_json()
    emit_fields([
        ("source", f"{data['source']} ({data['source_digest']})"),
        ("command", json.dumps(data["command"])),
        ("executable", data["executable"] or "(none)"),
        ("user", data["user"]),
        ("pwd", data["pwd"]),
        ("config id", data["config_id"]),
        ("enclave", ", ".join(f"{k}={v}" for k, v in data["enclave"].items())),
        ("relaxations", ", ".join(data["relaxations"]) or "none"),
    ])
    click.echo()
    emit_table(["region", "mode", "why"], [(r["path"], r["mode"], r["reason"]) for r in data["regions"]])
    click.echo()
    emit_table(["layer", "action", "why"], [(la["index"], la["action"], la["reason"]) for la in data["layers"]])
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}", err=True)


@click.command()
@click.argument("reference", metavar="REF")
@click.option("--policy", "policy", type=_FILE, required=True,
              help="The session.yml that convert wrote for this image.")
@click.option("--key", "key_file", type=_FILE,
              help="Public key (PEM) to check the image's cosign signature with; without it that check is skipped.")
@click.option("--service", help="Service of the policy to check against (default: the one the image's "
              "SCONE_CONFIG_ID names, or the only one).")
@click.option("--json", "as_json", is_flag=True, help="Print the result of every check as JSON.")
@platform_option
@transport_options()
@click.pass_context
def verify(ctx: click.Context, reference: str, **kw: Any) -> None:
    """Check the confidential image REF against its policy.

    \b
    Checks, each reported on one line:
      signature  the cosign signature of the image's manifest, with --key
      mrenclave  MRENCLAVE recomputed from the image's runtime, program and
                 enclave settings is one the policy's service allows
      fspf       the FSPF metadata opens with the policy's fspf_key and has
                 its fspf_tag, and every protected file verifies
    Exit code 13 when a check fails, 0 when all hold.

    \b
    Example:
      sconify verify docker://registry.example/confidential/app:1.4 \\
          --policy out/session.yml --key cosign.pub
    """
    from sconify.verify import iter_lines, verify_image

    result = verify_image(
        parse_reference(reference),
        kw["policy"],
        key_file=kw["key_file"],
        service=kw["service"],
        platform=parse_platform(kw["platform"]),
        transport=make_transport_options(kw["creds"], kw["authfile"], kw["tls_verify"], kw["daemon_host"],
                                         kw["cert_dir"]),
        progress=progress_for(ctx),
    )
    if kw["as_json"]:
        emit_json(result.to_json())
    else:
        for line in iter_lines(result):
            click.echo(line)
    if not result.ok:
        raise result.error()
