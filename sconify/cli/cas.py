"""``sconify cas``: a development CAS for simulation mode (``serve``) and uploading sessions to it (``push``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sconify.cli.render import emit_json

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)


@click.group()
def cas() -> None:
    """A development CAS for simulation mode. FOR DEVELOPMENT AND TESTS ONLY: it cannot attest enclaves."""


@cas.command()
@click.option("--state", type=_DIR, required=True, help="Directory for the CAS's SQLite store and TLS key (0700).")
@click.option("--listen", default="127.0.0.1:8081", show_default=True, metavar="HOST:PORT",
              help="Loopback address for HTTPS (port 0: any free port).")
@click.option("--unix", "unix", type=click.Path(path_type=Path), help="Serve plain HTTP on this unix socket instead.")
@click.option("--cert", type=_FILE, help="TLS certificate (default: a self-signed one in the state directory).")
@click.option("--key", type=_FILE, help="Its private key.")
def serve(state: Path, listen: str, unix: Path | None, cert: Path | None, key: Path | None) -> None:
    """Serve sessions, generate their secrets and hand each service its configuration when it presents an
    allowed measurement. Prints its address on stdout; runs until interrupted."""
    from sconify.devcas.server import WARNING, make_server
    from sconify.errors import UsageError

    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"--listen {listen!r} is not HOST:PORT.")
    server, address, store = make_server(state, host=host or "127.0.0.1", port=int(port), unix=unix, cert=cert,
                                         key=key)
    click.echo(f"WARNING: {WARNING}", err=True)
    click.echo(address)
    import sys

    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()


@cas.command()
@click.argument("session_file", metavar="SESSION.yml", type=_FILE)
@click.option("--cas", "address", required=True, help="https://127.0.0.1:PORT or unix:PATH of `sconify cas serve`.")
@click.option("--cafile", type=_FILE, help="The CAS's certificate (its state directory's cas.crt).")
def push(session_file: Path, address: str, cafile: Path | None) -> None:
    """Upload a session (e.g. the session.yml of `sconify app`) to a development CAS."""
    import yaml

    from sconify.devcas.server import request
    from sconify.errors import UsageError
    from sconify.secretfile import read_secret

    session: Any = yaml.safe_load(read_secret(session_file, "session"))
    status, body = request(address, "POST", "/v1/sessions", session, cafile=cafile)
    if status != 201:
        raise UsageError(f"the CAS refused {session_file}: {body.get('error', status)}")
    emit_json(body)
