"""``sconify analyze``: what an image runs and how sconify proposes to protect it, without running it."""

from __future__ import annotations

from typing import Any

import click

from sconify.analyze import analyze as analyze_image
from sconify.analyze.report import render_text
from sconify.cli.options import make_transport_options, parse_platform, platform_option, transport_options
from sconify.cli.progress import progress_for
from sconify.cli.render import emit_json
from sconify.image.reference import parse_reference
from sconify.image.transports import open_image
from sconify.rules import load_rules


@click.command()
@click.argument("reference", metavar="REF")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON (schema in docs/analysis-schema.md).")
@click.option(
    "--rules",
    "rule_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="A directory of rule files that override the shipped rules (repeatable; later directories win).",
)
@click.option("--libraries", "max_libraries", type=click.IntRange(min=0), default=12, show_default=True,
              help="How many libraries per program the report lists.")
@platform_option
@transport_options()
@click.pass_context
def analyze(
    ctx: click.Context,
    reference: str,
    as_json: bool,
    rule_dirs: tuple[str, ...],
    max_libraries: int,
    platform: str | None,
    **transport: Any,
) -> None:
    """Show what REF runs and what sconify would protect: command, program, ELF facts, interpreter,
    libraries, regions with reasons, enclave settings and warnings.

    Reads only the image (no Docker engine, nothing is run). Exits 11 when the image cannot be converted
    and 9 when it is not for x86-64; the report is printed first either way.
    """
    ruleset = load_rules(rule_dirs)
    image = open_image(
        parse_reference(reference), parse_platform(platform), make_transport_options(**transport)
    )
    result = analyze_image(image, ruleset, source=reference, progress=progress_for(ctx))
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(render_text(result, max_libraries=max_libraries))
    error = result.error()
    if error is not None:
        raise error
