"""Allow ``python -m sconify``."""

from sconify.cli import run

run()
