"""--runtime REF: the runtime program is taken from another image's Entrypoint and measured instead of the
built-in one; it lands at the runtime path of the converted image."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from fixtures.builder import build_image
from sconify.image.reference import parse_reference
from sconify.image.tarfs import read_layer
from sconify.image.transports import open_image


def convert(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sconify", "convert", *args, "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def runtime_bytes(ref: str) -> bytes:
    image = open_image(parse_reference(ref))
    with image.layers[-2].open_tar() as tar:  # the runtime layer comes just below the protection layer
        for entry, content in read_layer(tar):
            if entry.path == ".sconify/bin/sconify-run":
                return content.read()
    raise AssertionError("no runtime in the runtime layer")


def test_runtime_from_an_image_is_used_and_measured(tmp_path: Path) -> None:
    build_image("busybox-sh", tmp_path / "app", "latest")
    runtime = build_image("distroless", tmp_path / "runtime", "latest")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "fspf.key").write_text("ab" * 32)
    subprocess.run([sys.executable, "-m", "sconify", "keys", "generate", "--enclave", str(keys / "e.pem")],
                   check=True, capture_output=True)
    common = ["--fspf-key", str(keys / "fspf.key"), "--enclave-key", str(keys / "e.pem")]
    builtin = convert(f"oci:{tmp_path}/app:latest", f"oci:{tmp_path}/a:latest", "--policy-out",
                      str(tmp_path / "p1"), *common)
    other = convert(f"oci:{tmp_path}/app:latest", f"oci:{tmp_path}/b:latest", "--policy-out", str(tmp_path / "p2"),
                    "--runtime", f"oci:{tmp_path}/runtime:latest", *common)
    assert other["mrenclave"] != builtin["mrenclave"]
    # The runtime layer carries exactly the runtime image's entrypoint program.
    entry = runtime.facts["executable"]
    source = open_image(parse_reference(f"oci:{tmp_path}/runtime:latest"))
    want = None
    for layer in source.layers:
        with layer.open_tar() as tar:
            for e, content in read_layer(tar):
                if "/" + e.path == entry and content is not None:
                    want = content.read()
    assert want is not None
    got = runtime_bytes(f"oci:{tmp_path}/b:latest")
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
    report = json.loads((tmp_path / "p2" / "report.json").read_text())
    assert report["mrenclave"] == other["mrenclave"]
