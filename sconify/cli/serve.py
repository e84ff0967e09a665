"""``sconify serve``: the registry-triggered conversion service."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from sconify.cli.render import emit_fields, emit_json


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The service configuration (service.yaml; see docs/service.md).")
@click.option("--listen", metavar="HOST:PORT", help="Listen here instead of the configuration's 'listen'.")
@click.option("--workers", type=click.IntRange(0, 64), help="Worker processes (default: the configuration's).")
@click.option("--check", is_flag=True, help="Validate the configuration, print what it says and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: print the summary as JSON.")
@click.pass_context
def serve(ctx: click.Context, config_path: Path, listen: str | None, workers: int | None, check: bool,
          as_json: bool) -> None:
    """Run the service that converts images when a registry says they were pushed.

    \b
    Registries call POST /events/SOURCE (Docker Hub: /events/SOURCE/SECRET); the service answers at once,
    converts in worker processes, pushes the confidential image, its signature and its policy, and shows
    its jobs at GET /jobs, its health at GET /healthz and its metrics at GET /metrics.

    \b
    Example:
      sconify serve --config service.yaml
    """
    from dataclasses import replace

    from sconify.service.config import load_config, parse_listen

    config = load_config(config_path)
    if listen:
        host, port = parse_listen(listen)
        config = replace(config, host=host, port=port)
    if workers is not None:
        config = replace(config, workers=workers)
    if check:
        summary: dict[str, Any] = {
            "listen": config.listen,
            "store": str(config.store),
            "policy_dir": str(config.policy_dir),
            "cache": str(config.cache_dir) if config.cache_dir else None,
            "workers": config.workers,
            "sources": {n: {"type": s.kind, "registry": s.registry} for n, s in config.sources.items()},
            "routes": [{"name": r.name, "match": r.match, "destination": r.destination, "tag": r.tag}
                       for r in config.routes],
            "cas": config.cas.url if config.cas else None,
        }
        if as_json:
            emit_json(summary)
            return
        emit_fields([("listen", summary["listen"]), ("store", summary["store"]),
                     ("policies", summary["policy_dir"]), ("cache", summary["cache"] or "(none)"),
                     ("workers", config.workers), ("cas", summary["cas"] or "(none)")])
        for name, s in config.sources.items():
            click.echo(f"source {name}: {s.kind} events for {s.registry} at POST /events/{name}"
                       + ("/SECRET" if s.kind == "dockerhub" else ""))
        for r in config.routes:
            click.echo(f"route {r.name}: {r.match} -> {r.destination}:{r.tag}")
        return
    if not (ctx.obj or {}).get("quiet"):
        # A service reports what it does: events, jobs and requests at INFO unless -q.
        logging.getLogger("sconify").setLevel(min(logging.getLogger("sconify").getEffectiveLevel(), logging.INFO))
    from sconify.service.app import serve as run_service

    run_service(config)
