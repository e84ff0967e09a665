"""Allow ``python -m sconify``."""

from sconify.cli import main

main()
