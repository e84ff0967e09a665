"""``sconify rules``: check rule files, list the rules in effect, show one rule."""

from __future__ import annotations

from pathlib import Path

import click

from sconify.cli.render import emit_json, emit_table
from sconify.errors import NotFoundError, UsageError
from sconify.rules import check_dir, load_rules
from sconify.rules.model import format_size

_RULES_OPTION = click.option(
    "--rules",
    "rule_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="A directory of rule files that override the shipped rules (repeatable; later directories win).",
)


@click.group()
def rules() -> None:
    """Rule files: which regions, enclave settings and environment fit what an image runs."""


@rules.command("check")
@click.argument("directories", metavar="DIR...", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(directories: tuple[str, ...], as_json: bool) -> None:
    """Validate every *.yaml rule file in DIR: prints FILE:LINE: what is wrong, and exits 2 if anything is."""
    results = []
    total = 0
    for directory in directories:
        found, issues = check_dir(Path(directory))
        total += len(issues)
        results.append({"directory": directory, "rules": [r.name for r in found],
                        "issues": [i.to_json() for i in issues]})
        if not as_json:
            for issue in issues:
                click.echo(str(issue))
            if not issues:
                click.echo(f"{directory}: {len(found)} rule{'s' if len(found) != 1 else ''} ok"
                           + (f" ({', '.join(r.name for r in found)})" if found else ""))
    if as_json:
        emit_json({"ok": total == 0, "directories": results})
    if total:
        raise UsageError(f"{total} problem{'s' if total != 1 else ''} in the rule files; fix the lines listed above.")


@rules.command("list")
@_RULES_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the rules as JSON.")
def list_rules(rule_dirs: tuple[str, ...], as_json: bool) -> None:
    """List the rules in effect, lowest precedence first (later rules win conflicts)."""
    ruleset = load_rules(rule_dirs)
    if as_json:
        emit_json([
            {"name": r.name, "priority": r.priority, "origin": r.origin, "source": r.source,
             "description": r.description}
            for r in ruleset.rules
        ])
        return
    emit_table(["name", "priority", "origin", "enclave", "description"], [
        [r.name, r.priority, r.origin,
         " ".join(f"{k}={format_size(v) if k in ('heap', 'stack') else v}"
                  for k, v in r.enclave.__dict__.items() if v is not None),
         r.description]
        for r in ruleset.rules
    ])


@rules.command("show")
@click.argument("name")
@_RULES_OPTION
def show(name: str, rule_dirs: tuple[str, ...]) -> None:
    """Print the file of the rule NAME that is in effect."""
    ruleset = load_rules(rule_dirs)
    rule = ruleset.get(name)
    if rule is None:
        raise NotFoundError(f"there is no rule called {name!r}; 'sconify rules list' shows the rules in effect.")
    click.echo(f"# {rule.source} ({rule.origin})")
    click.echo(Path(rule.source).read_text(encoding="utf-8"), nl=False)
