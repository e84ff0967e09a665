"""Shared set-up of the ``convert`` and ``verify`` proofs: keys, the runtime, conversions cached per test run,
and helpers that read an output independently of the code under test (blobs, trees, the CLI).

No test lives here; the other ``test_convert_*`` and ``test_verify_*`` modules import from it. Conversions are
cached in a module-level dictionary (not a session fixture imported into several modules, which pytest would
run once per module), so every module asking for the same conversion gets the same output.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard

from sconify.build.runtime import BUILTIN, RUNTIME_ENV
from sconify.enclave.keys import generate_enclave_key, load_enclave_key
from sconify.errors import SconifyError

BUSYBOX = Path("/usr/bin/busybox")


def runtime_path() -> Path:
    """The runtime conversions use: the built open runtime when it exists, else a static busybox (any static
    x86-64 ELF measures; only the image's behaviour under Docker needs the real one)."""
    return BUILTIN if BUILTIN.exists() else BUSYBOX


def real_runtime() -> bool:
    return BUILTIN.exists()


@dataclass(frozen=True)
class Keys:
    """One set of key files for conversions and checks."""

    dir: Path
    fspf: Path  # 64 hex digits
    fspf_hex: str
    other_fspf: Path  # another volume key
    enclave: Path
    cosign_key: Path
    cosign_pub: Path
    other_pub: Path  # a public key that did not sign anything here

    def secrets(self) -> list[bytes]:
        """Byte strings that must never appear in an output image: the volume keys (raw and hex), the enclave
        key's private exponent and the image-signing key's private scalar (big-endian), and both PEM files."""
        from sconify.signing.keys import load_signing_key

        fspf_raw = bytes.fromhex(self.fspf_hex)
        other_hex = self.other_fspf.read_text().strip()
        enclave = load_enclave_key(self.enclave)
        d = enclave.private_numbers().d
        signing = load_signing_key(self.cosign_key)
        scalar = signing.private_numbers().private_value
        return [
            fspf_raw,
            self.fspf_hex.encode(),
            bytes.fromhex(other_hex),
            other_hex.encode(),
            d.to_bytes((d.bit_length() + 7) // 8, "big"),
            d.to_bytes((d.bit_length() + 7) // 8, "little"),
            scalar.to_bytes(32, "big"),
            self.enclave.read_bytes(),
            self.cosign_key.read_bytes(),
        ]


_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    with _LOCK:
        key = f"dir:{name}"
        if key not in _STATE:
            _STATE[key] = tmp_path_factory.mktemp(name)
        return _STATE[key]


def make_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Key files made once per test run (RSA-3072 generation takes a moment)."""
    from sconify.enclave.keys import enclave_key_pem
    from sconify.signing.keys import generate_cosign_keys

    with _LOCK:
        if "keys" in _STATE:
            return _STATE["keys"]
        base = tmp_path_factory.mktemp("convert-keys")
        fspf_hex = os.urandom(32).hex()
        (base / "fspf.key").write_text(fspf_hex + "\n")
        (base / "other-fspf.key").write_text(os.urandom(32).hex() + "\n")
        (base / "enclave.pem").write_bytes(enclave_key_pem(generate_enclave_key()))
        pair = generate_cosign_keys(base / "cosign")
        other = generate_cosign_keys(base / "other")
        keys = Keys(base, base / "fspf.key", fspf_hex, base / "other-fspf.key", base / "enclave.pem",
                    pair.private_path, pair.public_path, other.public_path)
        _STATE["keys"] = keys
        return keys


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory)


@pytest.fixture(scope="session", autouse=False)
def runtime() -> Iterator[Path]:
    """Points ``$SCONIFY_RUNTIME`` at busybox for the run when the open runtime is not built."""
    path = runtime_path()
    with pytest.MonkeyPatch.context() as mp:
        if not real_runtime():
            mp.setenv(RUNTIME_ENV, str(path))
        yield path


@dataclass(frozen=True)
class Converted:
    """One conversion of a fixture image, done through the library."""

    source: Any  # fixtures.BuildResult
    destination: str
    layout: Path | None  # for oci: destinations
    policy_dir: Path
    result: Any  # sconify.convert.ConvertResult

    @property
    def session(self) -> dict[str, Any]:
        return yaml.safe_load((self.policy_dir / "session.yml").read_text())

    @property
    def service(self) -> dict[str, Any]:
        return self.session["services"][0]

    @property
    def policy(self) -> Path:
        return self.policy_dir / "session.yml"


def convert_image(
    source: Any,
    destination: str,
    policy_dir: Path,
    keys: Keys,
    *,
    fspf_key: Path | None = None,
    sign: bool = True,
    **options: Any,
) -> Converted:
    """Convert a fixture image with the given keys (the volume key from ``fspf_key``, default ``keys.fspf``)."""
    from sconify.convert import convert
    from sconify.image.reference import parse_reference
    from sconify.plan import ConvertOptions

    dest = parse_reference(destination)
    result = convert(
        parse_reference(source.reference),
        dest,
        ConvertOptions(**options),
        policy_out=policy_dir,
        fspf_key_file=fspf_key or keys.fspf,
        enclave_key_file=keys.enclave,
        sign_key_file=keys.cosign_key if sign else None,
    )
    layout = Path(dest.path) if dest.transport == "oci" and dest.path else None
    return Converted(source, destination, layout, policy_dir, result)


def cached_conversion(
    tmp_path_factory: pytest.TempPathFactory, fixture_image: Any, keys: Keys, name: str, variant: str = "default",
    **kwargs: Any,
) -> Converted:
    """``name`` converted into an OCI layout, once per test run for each ``variant``."""
    with _LOCK:
        key = f"conv:{name}:{variant}"
        if key in _STATE:
            return _STATE[key]
        source = fixture_image(name)
        base = tmp_path_factory.mktemp(f"converted-{name}-{variant}")
        with pytest.MonkeyPatch.context() as mp:
            if not real_runtime():
                mp.setenv(RUNTIME_ENV, str(BUSYBOX))
            converted = convert_image(source, f"oci:{base / 'layout'}:latest", base / "policy", keys, **kwargs)
        _STATE[key] = converted
        return converted


# -- reading outputs without the code under test ----------------------------------------------------------


def decompressed(data: bytes) -> bytes:
    """A blob's bytes, gunzipped or un-zstd'ed when they are compressed (sniffed from the magic)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def layout_blobs(layout: Path) -> Iterator[tuple[str, bytes]]:
    """Every blob of an OCI layout (index.json too), decompressed where compressed."""
    yield "index.json", (layout / "index.json").read_bytes()
    for path in sorted((layout / "blobs").rglob("*")):
        if path.is_file():
            yield f"{path.parent.name}:{path.name}", decompressed(path.read_bytes())


def layout_manifest(layout: Path, tag: str = "latest") -> tuple[str, dict[str, Any]]:
    """The digest and manifest of ``tag`` in an OCI layout, read with json only."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            algo, hexd = desc["digest"].split(":")
            return desc["digest"], json.loads((layout / "blobs" / algo / hexd).read_bytes())
    raise KeyError(tag)


def blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":")
    return layout / "blobs" / algo / hexd


@dataclass(frozen=True)
class FileFacts:
    """What the round trip compares for one path of an extracted tree."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    size: int | None
    sha256: str | None
    target: str | None


def tree_facts(root: Path, skip: tuple[str, ...] = ()) -> tuple[dict[str, FileFacts], list[list[str]]]:
    """Every path below ``root`` with kind, mode, owner, mtime, size, content hash, link target; and the groups
    of paths that share an inode (hard links)."""
    facts: dict[str, FileFacts] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            digest = size = target = None
            if stat.S_ISREG(kind):
                with open(full, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                size = st.st_size
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(kind):
                target = os.readlink(full)
            facts[rel] = FileFacts(
                kind=stat.filemode(kind)[0] if kind != stat.S_IFREG else "-",
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=st.st_mtime_ns,
                size=size,
                sha256=digest,
                target=target,
            )
    groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return facts, groups


# -- the command line, in process ------------------------------------------------------------------------


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> CliRun:
    """``sconify ARGS...`` through ``sconify.cli.main`` (the real exit-code mapping), output captured."""
    from sconify.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    except SconifyError as exc:  # pragma: no cover - main maps every SconifyError
        code = exc.exit_code
    out = capsys.readouterr()
    sys.stdout.flush()
    return CliRun(code, out.out, out.err)
