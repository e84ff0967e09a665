"""Rendering of results for people (tables, key/value lines) and machines (JSON) on stdout."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import click


def emit_json(obj: Any) -> None:
    """Print one JSON document, indented and with sorted keys, on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def emit_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print rows as an aligned text table with a header line."""
    text_rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers))
    click.echo(line.rstrip())
    for row in text_rows:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def emit_fields(pairs: Iterable[tuple[str, Any]]) -> None:
    """Print ``name: value`` lines with the names aligned."""
    items = [(k, "" if v is None else str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0)
    for k, v in items:
        click.echo(f"{(k + ':').ljust(width + 1)} {v}")
