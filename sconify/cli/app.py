"""``sconify app``: convert every service of a confidential application into one policy set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sconify.cli.progress import progress_for
from sconify.cli.render import emit_fields, emit_json, emit_table

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)


@click.command()
@click.argument("app_file", metavar="APP.yaml", type=_FILE)
@click.option("--policy-out", type=_DIR, default=Path("policy"), show_default=True,
              help="Directory for the application's session.yml, report.json, per-service files and chart (0700).")
@click.option("--enclave-key", type=_FILE, help="RSA-3072 (e=3) enclave signing key for every service; default: "
              "a new one, saved in the policy directory.")
@click.option("--sign-key", type=_FILE, help="ECDSA P-256 key to sign every image in cosign's format.")
@click.option("--cache", "cache_dir", type=_DIR, envvar="SCONIFY_CACHE", metavar="DIR",
              help="Keep per-layer work here and reuse it (default: $SCONIFY_CACHE; none when unset).")
@click.option("--check", is_flag=True, help="Only validate APP.yaml and print its services and peers.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def app(ctx: click.Context, app_file: Path, **kw: Any) -> None:
    """Convert every service of the application described in APP.yaml into one CAS session (one CA, mutual TLS
    between exactly the peers the file names) and one Helm chart.

    \b
    Example:
      sconify app shop.yaml --policy-out out/ --sign-key cosign.key
    """
    from sconify.application import convert_app, load_app
    from sconify.build.cache import LayerCache

    application = load_app(app_file)
    if kw["check"]:
        if kw["as_json"]:
            emit_json({"application": application.name, "session": application.session,
                       "services": [{"name": s.name, "accepts": list(s.accepts), "connects": list(s.connects)}
                                    for s in application.services],
                       "relaxations": [r for r, _ in application.relaxations]})
            return
        emit_table(["service", "accepts", "connects"],
                   [(s.name, ", ".join(s.accepts) or "-", ", ".join(s.connects) or "-") for s in application.services])
        return
    result = convert_app(
        application,
        policy_out=kw["policy_out"],
        enclave_key_file=kw["enclave_key"],
        sign_key_file=kw["sign_key"],
        cache=LayerCache(kw["cache_dir"]) if kw["cache_dir"] else None,
        progress=progress_for(ctx),
    )
    if kw["as_json"]:
        emit_json(result.to_json())
        return
    emit_fields([("application", application.name), ("session", application.session),
                 ("policy", f"{result.policy_dir}/session.yml"),
                 ("relaxations", ", ".join(r for r, _ in application.relaxations) or "none (strict)")])
    click.echo()
    emit_table(["service", "destination", "mrenclave", "config id"],
               [(s["name"], s["destination"], s["mrenclave"][:16], s["config_id"]) for s in result.report["services"]])
