"""The ``sconify`` command line: parse, call the library, render; errors become exit codes here only."""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import os
import sys
import threading
from typing import Any

import click

from sconify import __version__
from sconify.errors import SconifyError

# Command name -> "module:attribute". Each command lives in its own module under sconify.cli so that
# parts of the tool can grow independently; a module that does not exist yet is simply not listed.
COMMANDS: dict[str, str] = {
    "copy": "sconify.cli.image:copy",
    "inspect": "sconify.cli.image:inspect",
    "analyze": "sconify.cli.analyze:analyze",
    "rules": "sconify.cli.rules:rules",
    "fs": "sconify.cli.fs:fs",
    "enclave": "sconify.cli.enclave:enclave",
    "keys": "sconify.cli.keys:keys",
    "convert": "sconify.cli.convert:convert",
    "verify": "sconify.cli.convert:verify",
    "batch": "sconify.cli.batch:batch",
    "worker": "sconify.cli.batch:worker",
    "serve": "sconify.cli.serve:serve",
    "app": "sconify.cli.app:app",
    "cas": "sconify.cli.cas:cas",
}

EXIT_INTERNAL = 70
EXIT_OS = 74  # an operating-system error on a file or directory (sysexits' EX_IOERR)
EXIT_INTERRUPTED = 130


def _available(spec: str) -> bool:
    module = spec.split(":", 1)[0]
    return importlib.util.find_spec(module) is not None


class _LazyGroup(click.Group):
    """A group whose subcommands are imported only when used, keeping start-up fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, spec in COMMANDS.items() if _available(spec))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None or not _available(spec):
            return None
        module_name, attr = spec.split(":", 1)
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sconify")
@click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or diagnostics; results and errors only.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Turn native container images into confidential SCONE images for Intel SGX."""
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="sconify: %(levelname)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script: run the group and map every outcome to an exit code."""
    verbose = any(a in ("-v", "-vv", "--verbose") for a in (argv if argv is not None else sys.argv[1:]))
    try:
        cli.main(args=argv, prog_name="sconify", standalone_mode=False)
    except SconifyError as exc:
        click.echo(f"sconify: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("sconify: interrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("sconify: interrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as exc:  # the machine said no (disk full, permission, missing directory): name it
        where = f" {exc.filename!r}" if exc.filename else ""
        click.echo(f"sconify: error: cannot use{where}: {exc.strerror or exc}; check the path and its permissions.",
                   err=True)
        sys.exit(EXIT_OS)
    except Exception as exc:  # a bug in sconify: say so plainly, keep the traceback for -v
        if verbose:
            logging.getLogger("sconify").exception("internal error")
        click.echo(
            f"sconify: internal error: {type(exc).__name__}: {exc} "
            "(this is a bug in sconify; run with -v for the traceback and please report it).",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


def run() -> None:
    """The console script: ``main``, then a quick exit.

    Tearing the interpreter down (some 350 modules) takes longer than many a short command. Once the command
    is done, only this thread is left and no profiler or tracer waits for the end, the exit handlers run (log
    handlers, temporary files), the standard streams are flushed and the process ends without the teardown.
    Otherwise it exits the ordinary way.
    """
    try:
        main()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    if (threading.active_count() > 1 or not isinstance(code, int | None)
            or sys.getprofile() is not None or sys.gettrace() is not None):  # a profiler or coverage reports at exit
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as exc:  # the results could not be written out (disk full): the command did not succeed
        click.echo(f"sconify: error: cannot write the output: {exc.strerror or exc}.", err=True)
        code = code or EXIT_OS
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code or 0)

