"""``sconify keys``: make the keys sconify signs with: the enclave signing key and the image-signing key pair."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sconify.cli.render import emit_json, emit_table
from sconify.enclave.keys import (
    ENCLAVE_KEY_BITS,
    ENCLAVE_KEY_EXPONENT,
    generate_enclave_key,
    mrsigner_of_key,
    read_passphrase,
    write_enclave_key,
)
from sconify.errors import UsageError

_FILE = click.Path(dir_okay=False, path_type=Path)

# One maker per kind of key: (option value, passphrase, force) -> a row describing what was written.
# Another kind of key is one more option on ``generate`` and one more entry here.
KeyMaker = Callable[[Any, bytes | None, bool], dict[str, Any]]


def _make_enclave_key(path: Path, passphrase: bytes | None, force: bool) -> dict[str, Any]:
    key = generate_enclave_key()
    write_enclave_key(path, key, passphrase, force)
    return {
        "kind": "enclave",
        "path": str(path),
        "algorithm": f"RSA-{ENCLAVE_KEY_BITS} e={ENCLAVE_KEY_EXPONENT}",
        "encrypted": bool(passphrase),
        "mrsigner": mrsigner_of_key(key).hex(),
    }


def _make_cosign_keys(prefix: Path, passphrase: bytes | None, force: bool) -> dict[str, Any]:
    from sconify.signing.keys import generate_cosign_keys

    pair = generate_cosign_keys(prefix, passphrase, force)
    return {
        "kind": "cosign",
        "path": f"{pair.private_path} + {pair.public_path}",
        "algorithm": "ECDSA P-256",
        "encrypted": bool(passphrase),
        "mrsigner": "",
    }


MAKERS: dict[str, KeyMaker] = {"enclave": _make_enclave_key, "cosign": _make_cosign_keys}


@click.group()
def keys() -> None:
    """Make signing keys."""


@keys.command("generate")
@click.option(
    "--enclave",
    "enclave_out",
    type=_FILE,
    metavar="OUT.pem",
    help="Write a new enclave signing key (RSA-3072, exponent 3) here, mode 0600.",
)
@click.option(
    "--cosign",
    "cosign_prefix",
    type=_FILE,
    metavar="PREFIX",
    help="Write a new image-signing key pair for cosign's format: PREFIX.key (ECDSA P-256, PKCS#8, "
    "mode 0600) and PREFIX.pub.",
)
@click.option(
    "--passphrase-file",
    type=_FILE,
    metavar="FILE",
    help="Encrypt the key with the passphrase on this file's first line "
    "[default: $SCONIFY_ENCLAVE_KEY_PASSPHRASE, else not encrypted].",
)
@click.option("--force", is_flag=True, help="Replace a key file that already exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the keys written.")
def generate(
    enclave_out: Path | None, cosign_prefix: Path | None, passphrase_file: Path | None, force: bool, as_json: bool
) -> None:
    """Generate new keys; never overwrites an existing key file without --force."""
    requested = {"enclave": enclave_out, "cosign": cosign_prefix}
    wanted = {kind: value for kind, value in requested.items() if value is not None}
    if not wanted:
        raise UsageError("say which key to make, such as `sconify keys generate --enclave key.pem`.")
    passphrase = read_passphrase(passphrase_file)
    rows = [MAKERS[kind](value, passphrase, force) for kind, value in wanted.items()]
    if as_json:
        emit_json(rows)
        return
    emit_table(
        ["kind", "path", "algorithm", "encrypted", "mrsigner"],
        [(r["kind"], r["path"], r["algorithm"], "yes" if r["encrypted"] else "no", r["mrsigner"]) for r in rows],
    )
