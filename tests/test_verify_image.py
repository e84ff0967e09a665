"""``sconify verify``: it passes on what convert wrote and names what failed after each kind of tampering (a
flipped byte in a sealed file, a file added, removed or overridden by an extra layer, a swapped runtime, a changed
enclave setting, a policy of another conversion, a wrong key, a missing signature).

Tampered images are made from a copy of a converted OCI layout, by umoci (``raw add-layer``) or by editing a blob
by hand and re-hashing everything above it, as an attacker with write access to a registry would.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_convert_support import (
    Converted,
    Keys,
    blob_path,
    cached_conversion,
    decompressed,
    keys,  # noqa: F401 (fixture)
    layout_manifest,
    real_runtime,
    run_cli,
    runtime_path,
)

from sconify.build.runtime import BUILTIN
from sconify.enclave.measurement import measure
from sconify.enclave.settings import DlopenMode, EnclaveSettings
from sconify.errors import UsageError
from sconify.image.reference import parse_reference
from sconify.verify import settings_from_env, verify_image


@pytest.fixture
def converted(tmp_path_factory: pytest.TempPathFactory, fixture_image, keys: Keys) -> Converted:  # noqa: F811
    return cached_conversion(tmp_path_factory, fixture_image, keys, "busybox-sh")


@pytest.fixture
def other(tmp_path_factory: pytest.TempPathFactory, fixture_image, keys: Keys) -> Converted:  # noqa: F811
    """The same source converted again with another volume key: another policy for an equally good image."""
    return cached_conversion(tmp_path_factory, fixture_image, keys, "busybox-sh", "other-key",
                             fspf_key=keys.other_fspf)


def _verify(converted: Converted, layout: Path, keys: Keys, policy: Path | None = None,  # noqa: F811
            key: Path | None = None):
    return verify_image(parse_reference(f"oci:{layout}:latest"), policy or converted.policy,
                        key_file=key or keys.cosign_pub)


def _copy(converted: Converted, tmp_path: Path) -> Path:
    target = tmp_path / "layout"
    shutil.copytree(converted.layout, target)
    return target


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return digest, len(data)


def _rewrite(layout: Path, *, layer: int | None = None, edit_tar: Callable[[bytes], bytes] | None = None,
             edit_config: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Change one layer's tar and/or the config by hand and re-hash the config, manifest and index above it."""
    _, manifest = layout_manifest(layout)
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())
    if layer is not None and edit_tar is not None:
        raw = blob_path(layout, manifest["layers"][layer]["digest"]).read_bytes()
        tar = edit_tar(decompressed(raw))
        config["rootfs"]["diff_ids"][layer] = "sha256:" + hashlib.sha256(tar).hexdigest()
        digest, size = _put_blob(layout, gzip.compress(tar, mtime=0) if raw[:2] == b"\x1f\x8b" else tar)
        manifest["layers"][layer].update(digest=digest, size=size)
    if edit_config is not None:
        edit_config(config)
    digest, size = _put_blob(layout, json.dumps(config).encode())
    manifest["config"].update(digest=digest, size=size)
    digest, size = _put_blob(layout, json.dumps(manifest).encode())
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc["annotations"]["org.opencontainers.image.ref.name"] == "latest":
            desc.update(digest=digest, size=size)
    (layout / "index.json").write_text(json.dumps(index))


def _flip_member_byte(path: str, offset: int = 0) -> Callable[[bytes], bytes]:
    def edit(tar: bytes) -> bytes:
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            member = archive.getmember(path)
        data = bytearray(tar)
        data[member.offset_data + offset] ^= 0x01
        return bytes(data)

    return edit


def _add_layer(layout: Path, tmp_path: Path, members: list[tuple[str, bytes | None]]) -> None:
    """Append a layer with ``members`` (path, content; None for an empty whiteout file) using umoci."""
    archive = tmp_path / "extra.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content or b"")
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(content or b""))
    subprocess.run(["umoci", "raw", "add-layer", "--image", f"{layout}:latest", str(archive)], check=True,
                   capture_output=True, text=True, timeout=60)


def _sealed(converted: Converted, path: str) -> bytes:
    """The stored (sealed) bytes of ``path`` from the output layer that holds it."""
    _, manifest = layout_manifest(converted.layout)
    for desc in reversed(manifest["layers"]):
        with tarfile.open(fileobj=io.BytesIO(decompressed(blob_path(converted.layout, desc["digest"])
                                                          .read_bytes()))) as tar:
            try:
                member = tar.getmember(path)
            except KeyError:
                continue
            return tar.extractfile(member).read()  # type: ignore[union-attr]
    raise KeyError(path)


def _rewritten_layer_with(converted: Converted, path: str) -> int:
    for action in converted.result.report["layers"]:
        if action["result"] == "rewritten":
            _, manifest = layout_manifest(converted.layout)
            tar = decompressed(blob_path(converted.layout, manifest["layers"][action["index"]]["digest"])
                               .read_bytes())
            with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
                if path in archive.getnames():
                    return action["index"]
    raise KeyError(path)


# -- passes ------------------------------------------------------------------------------------------------


def test_verify_passes_on_the_converted_image(converted: Converted, keys: Keys, capsys) -> None:  # noqa: F811
    run = run_cli(capsys, "verify", f"oci:{converted.layout}:latest", "--policy", str(converted.policy),
                  "--key", str(keys.cosign_pub))
    assert run.code == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["signature:", "ok:"], ["mrenclave:", "ok:"], ["fspf:", "ok:"]]
    assert converted.result.mrenclave in lines[1]
    assert converted.service["fspf_tag"] in lines[2]
    assert run.stderr == ""

    run = run_cli(capsys, "verify", f"oci:{converted.layout}:latest", "--policy", str(converted.policy),
                  "--json")
    assert run.code == 0
    doc = json.loads(run.stdout)
    assert doc["ok"] is True and doc["digest"] == converted.result.digest
    status = {c["check"]: c["status"] for c in doc["checks"]}
    assert status == {"signature": "skipped", "mrenclave": "ok", "fspf": "ok"}
    fspf = next(c for c in doc["checks"] if c["check"] == "fspf")
    assert fspf["files"] == converted.result.report["protected_files"]
    assert fspf["bytes"] == converted.result.report["protected_bytes"]


@pytest.mark.parametrize("name", ["dynamic-c", "python-app"])
def test_verify_passes_on_other_fixtures(name: str, tmp_path_factory: pytest.TempPathFactory, fixture_image,
                                         keys: Keys) -> None:  # noqa: F811
    converted = cached_conversion(tmp_path_factory, fixture_image, keys, name)
    result = _verify(converted, converted.layout, keys)
    assert result.ok and [c.status for c in result.checks] == ["ok", "ok", "ok"]
    assert result.check("mrenclave").details["executable"] == converted.result.plan.executable
    assert result.check("fspf").details["files"] == converted.result.report["protected_files"]


# -- tampering with protected files ---------------------------------------------------------------------


def test_a_flipped_byte_in_a_sealed_file_is_found(converted: Converted, keys: Keys, tmp_path: Path,  # noqa: F811
                                                  capsys) -> None:
    layout = _copy(converted, tmp_path)
    index = _rewritten_layer_with(converted, "app/conf/app.conf")
    _rewrite(layout, layer=index, edit_tar=_flip_member_byte("app/conf/app.conf", 5))
    run = run_cli(capsys, "verify", f"oci:{layout}:latest", "--policy", str(converted.policy),
                  "--key", str(keys.cosign_pub))
    assert run.code == 13
    lines = {name: text.strip() for name, text in (line.split(":", 1) for line in run.stdout.splitlines())}
    assert lines["fspf"].startswith("FAILED: 1 protected path fails verification: /app/conf/app.conf: chunk 0 (")
    assert lines["mrenclave"].startswith("ok:")
    assert lines["signature"].startswith("FAILED: there is no signature")  # the manifest changed
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sconify: error: ") and "signature and fspf checks failed" in err[0]


def test_a_file_overridden_added_or_removed_by_an_extra_layer_is_found(
    converted: Converted, keys: Keys, tmp_path: Path  # noqa: F811
) -> None:
    sealed = bytearray(_sealed(converted, "app/conf/app.conf"))
    sealed[0] ^= 0x80
    layout = _copy(converted, tmp_path)
    _add_layer(layout, tmp_path, [
        ("app/conf/app.conf", bytes(sealed)),  # the sealed bytes with one bit flipped, in an upper layer
        ("app/evil.sh", b"#!/bin/sh\necho owned\n"),  # a new file in an encrypted region
        ("app/lib/.wh.settings.py", None),  # a protected file removed
        ("tmp/scratch.txt", b"not protected: allowed\n"),
    ])
    result = _verify(converted, layout, keys)
    fspf = result.check("fspf")
    assert fspf.status == "failed"
    kinds = {p["path"]: p["kind"] for p in fspf.details["problems"]}
    assert kinds == {"/app/conf/app.conf": "tampered-chunk", "/app/evil.sh": "unexpected",
                     "/app/lib/settings.py": "missing"}
    assert result.check("mrenclave").ok
    assert result.failed == ("signature", "fspf")


def test_a_sealed_file_put_back_as_plaintext_is_found(converted: Converted, keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    marker = next(m for m in converted.source.markers if m.purpose == "conf")
    layout = _copy(converted, tmp_path)
    plain = f"greeting=hello\n# {marker.value}\n".encode()
    _add_layer(layout, tmp_path, [("app/conf/app.conf", plain)])
    problems = _verify(converted, layout, keys).check("fspf").details["problems"]
    assert [(p["path"], p["kind"]) for p in problems] in (
        [("/app/conf/app.conf", "tampered-chunk")], [("/app/conf/app.conf", "truncated")],
        [("/app/conf/app.conf", "extended")])


def test_a_blob_changed_without_rehashing_is_caught_while_it_streams(
    converted: Converted, keys: Keys, tmp_path: Path  # noqa: F811
) -> None:
    layout = _copy(converted, tmp_path)
    _, manifest = layout_manifest(layout)
    blob = blob_path(layout, manifest["layers"][_rewritten_layer_with(converted, "app/conf/app.conf")]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = _verify(converted, layout, keys)
    assert result.check("signature").ok  # the manifest itself is untouched
    for name in ("mrenclave", "fspf"):
        check = result.check(name)
        assert check.status == "failed" and "cannot be read to the end" in check.message, check.message


# -- tampering with what is measured -------------------------------------------------------------------


def test_a_swapped_runtime_changes_mrenclave(converted: Converted, keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    data = bytearray(runtime_path().read_bytes())
    ident = b"sconify-run open runtime" if real_runtime() else b"BusyBox v"
    at = data.find(ident)
    assert at > 0
    data[at] ^= 0x20  # a byte of loaded read-only data: still a valid program, another measurement
    layout = _copy(converted, tmp_path)
    _add_layer(layout, tmp_path, [(".sconify/bin/sconify-run", bytes(data))])
    result = _verify(converted, layout, keys)
    check = result.check("mrenclave")
    assert check.status == "failed" and "does not allow" in check.message
    assert check.details["mrenclave"] != converted.result.mrenclave
    assert result.check("fspf").ok  # the runtime is measured, not shielded


def test_a_changed_enclave_setting_in_the_image_changes_mrenclave(
    converted: Converted, keys: Keys, tmp_path: Path  # noqa: F811
) -> None:
    def bigger_heap(config: dict[str, Any]) -> None:
        env = config["config"]["Env"]
        config["config"]["Env"] = [e if not e.startswith("SCONE_HEAP=") else "SCONE_HEAP=2G" for e in env]

    layout = _copy(converted, tmp_path)
    _rewrite(layout, edit_config=bigger_heap)
    check = _verify(converted, layout, keys).check("mrenclave")
    assert check.status == "failed" and "heap 2G" in check.message
    assert check.details["enclave"]["heap"] == 2 << 30


def test_an_image_that_names_another_program_fails_the_measurement(
    converted: Converted, keys: Keys, tmp_path: Path  # noqa: F811
) -> None:
    def other_program(config: dict[str, Any]) -> None:
        config["config"]["Env"] = [e for e in config["config"]["Env"] if not e.startswith("SCONIFY_EXECUTABLE=")]
        config["config"]["Env"].append("SCONIFY_EXECUTABLE=/app/bin/probe")

    layout = _copy(converted, tmp_path)
    _rewrite(layout, edit_config=other_program)
    check = _verify(converted, layout, keys).check("mrenclave")
    assert check.status == "failed" and "/app/bin/probe" in check.message


# -- policies and keys ---------------------------------------------------------------------------------


def test_the_policy_of_another_conversion_does_not_fit(converted: Converted, other: Converted, keys: Keys,  # noqa: F811
                                                      capsys) -> None:
    run = run_cli(capsys, "verify", f"oci:{converted.layout}:latest", "--policy", str(other.policy),
                  "--key", str(keys.cosign_pub), "--json")
    assert run.code == 13
    doc = json.loads(run.stdout)
    checks = {c["check"]: c for c in doc["checks"]}
    assert checks["signature"]["status"] == "ok"
    assert checks["mrenclave"]["status"] == "ok"  # same source, runtime and settings: same measurement
    assert checks["fspf"]["status"] == "failed"
    assert "another key" in checks["fspf"]["message"]
    assert doc["failed"] == ["fspf"]


def test_a_wrong_public_key_or_a_missing_signature_fails_the_signature_check(
    converted: Converted, other: Converted, keys: Keys, tmp_path: Path  # noqa: F811
) -> None:
    wrong = _verify(converted, converted.layout, keys, key=keys.other_pub).check("signature")
    assert wrong.status == "failed" and "does not verify with the given key" in wrong.message
    # A copy of the layout without the .sig tag: the image was never signed.
    layout = _copy(converted, tmp_path)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] = [d for d in index["manifests"]
                          if not d["annotations"]["org.opencontainers.image.ref.name"].endswith(".sig")]
    (layout / "index.json").write_text(json.dumps(index))
    unsigned = _verify(converted, layout, keys).check("signature")
    assert unsigned.status == "failed" and "no signature" in unsigned.message


def test_bad_arguments_are_errors_not_verdicts(converted: Converted, keys: Keys, tmp_path: Path, capsys) -> None:  # noqa: F811
    ref = f"oci:{converted.layout}:latest"
    cases = [
        (["--policy", str(tmp_path / "none.yml")], 4, "does not exist"),
        (["--policy", str(converted.policy), "--key", str(tmp_path / "none.pub")], 10, "does not exist"),
        (["--policy", str(converted.policy), "--key", str(keys.cosign_key)], 10, "not a PEM public key"),
        (["--policy", str(converted.policy), "--service", "nope"], 2, "no service 'nope'"),
    ]
    for args, code, words in cases:
        run = run_cli(capsys, "verify", ref, *args)
        assert run.code == code, (args, run.stderr)
        assert run.stdout == "" and words in run.stderr and len(run.stderr.strip().splitlines()) == 1
    run = run_cli(capsys, "verify", f"oci:{tmp_path / 'nothing'}:latest", "--policy", str(converted.policy))
    assert run.code == 4


# -- the settings as the runtime reads them -------------------------------------------------------------


def test_settings_are_parsed_as_the_runtime_parses_them() -> None:
    assert settings_from_env({}) == EnclaveSettings()
    assert settings_from_env({"SCONE_HEAP": "", "SCONE_THREADS": ""}) == EnclaveSettings()
    parsed = settings_from_env({"SCONE_HEAP": " 64MiB ", "SCONE_STACK": "4097", "SCONE_THREADS": " 16 ",
                                "SCONE_ALLOW_DLOPEN": "Protected", "SCONE_DEBUG": "1"})
    assert parsed == EnclaveSettings(heap=64 << 20, stack=8192, threads=16, dlopen=DlopenMode.PROTECTED, debug=True)
    assert settings_from_env({"SCONE_ALLOW_DLOPEN": "2"}).dlopen is DlopenMode.UNPROTECTED
    for bad in ({"SCONE_HEAP": "lots"}, {"SCONE_HEAP": "0"}, {"SCONE_THREADS": "8x"}, {"SCONE_THREADS": "0"},
                {"SCONE_DEBUG": "yes"}, {"SCONE_ALLOW_DLOPEN": "sometimes"}, {"SCONE_HEAP": "2T"}):
        with pytest.raises(UsageError):
            settings_from_env(bad)


@pytest.mark.skipif(not BUILTIN.exists(), reason="the open runtime is not built (scripts/build-runtime)")
@pytest.mark.parametrize("env", [
    {"SCONE_HEAP": " 64m ", "SCONE_STACK": "4097", "SCONE_THREADS": " 3 "},
    {"SCONE_HEAP": "96MiB", "SCONE_ALLOW_DLOPEN": " Unprotected", "SCONE_DEBUG": "1"},
    {"SCONE_HEAP": "", "SCONE_STACK": "256k", "SCONE_ALLOW_DLOPEN": "1", "SCONE_DEBUG": " 0 "},
])
def test_the_runtime_measures_what_verify_computes(env: dict[str, str], tmp_path: Path) -> None:
    program = Path("/usr/bin/busybox")
    run = subprocess.run([str(BUILTIN), "--measure"], capture_output=True, text=True, timeout=60,
                         env={**env, "SCONIFY_EXECUTABLE": str(program), "PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stderr
    expected = measure(BUILTIN.read_bytes(), program.read_bytes(), settings_from_env(env)).mrenclave.hex()
    assert run.stdout.strip() == expected
