"""The ``sconify enclave`` and ``sconify keys`` commands: output, files written, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sconify.cli import main
from sconify.enclave import EnclaveSettings, measure

BUSYBOX = Path("/usr/bin/busybox")


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    def invoke(*args: object) -> Result:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("cli")
    (d / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n')
    subprocess.run([gcc, "-O1", "-o", str(d / "hello"), str(d / "hello.c")], check=True)
    return {"dir": d, "runtime": BUSYBOX, "executable": d / "hello"}


@pytest.fixture(scope="module")
def key_file(files: dict[str, Path]) -> Path:
    path = files["dir"] / "enclave-key.pem"
    try:
        main(["keys", "generate", "--enclave", str(path)])
    except SystemExit as exc:
        assert exc.code == 0
    return path


def _modulus_le(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key().public_numbers().n.to_bytes(384, "little")


def _enclave_args(files: dict[str, Path], *extra: object) -> list[object]:
    return ["--runtime", files["runtime"], "--executable", files["executable"], *extra]


# --- measure ----------------------------------------------------------------------------------------


def test_measure_json_and_sgxs_export(run, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "enclave.sgxs"
    r = run("enclave", "measure", *_enclave_args(files, "--heap", "16M", "--threads", "2"), "--sgxs", out, "--json")
    assert r.code == 0, r.err
    info = r.json()
    expected = measure(files["runtime"].read_bytes(), files["executable"].read_bytes(),
                       EnclaveSettings(heap=16 << 20, threads=2))
    assert info["mrenclave"] == expected.mrenclave.hex()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == info["mrenclave"]
    assert [reg["name"] for reg in info["regions"]] == ["settings", "runtime", "executable", "threads", "heap"]
    assert info["settings"] == {"heap": 16 << 20, "stack": 1 << 20, "threads": 2, "dlopen": "off", "debug": False}
    assert info["sgxs"] == str(out)


def test_measure_for_people_prints_mrenclave_and_regions(run, files: dict[str, Path]) -> None:
    r = run("enclave", "measure", *_enclave_args(files))
    assert r.code == 0, r.err
    expected = measure(files["runtime"].read_bytes(), files["executable"].read_bytes(), EnclaveSettings())
    assert f"mrenclave:    {expected.mrenclave.hex()}" in r.out
    assert "REGION" in r.out and "heap" in r.out and "64M" in r.out


def test_option_order_and_size_spelling_do_not_matter(run, files: dict[str, Path]) -> None:
    a = run("enclave", "measure", "--heap", "64M", "--runtime", files["runtime"], "--threads", "4",
            "--executable", files["executable"], "--dlopen", "protected", "--json")
    b = run("enclave", "measure", "--dlopen", "1", "--executable", files["executable"], "--threads", "4",
            "--json", "--runtime", files["runtime"], "--heap", str(64 << 20))
    assert a.code == b.code == 0
    assert a.json()["mrenclave"] == b.json()["mrenclave"]


def test_file_location_and_timestamps_do_not_matter(run, files: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "other-name"
    shutil.copy(files["executable"], copy)
    os.utime(copy, (0, 0))
    a = run("enclave", "measure", *_enclave_args(files), "--json")
    b = run("enclave", "measure", "--runtime", files["runtime"], "--executable", copy, "--json")
    assert a.json()["mrenclave"] == b.json()["mrenclave"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--image", "docker://example/app:1"], 2, "--image is not available yet"),
        ([], 2, "say which enclave: --runtime FILE [--executable FILE]."),
        (["--executable", "/usr/bin/busybox"], 2, "--executable needs --runtime"),
        (["--runtime", "/no/such/file"], 4, "runtime file /no/such/file does not exist"),
        (["--runtime", "/etc/hostname"], 9, "cannot be measured: it is not an ELF file"),
        (["--runtime", "/usr/bin/busybox", "--heap", "lots"], 2, "heap size 'lots' is not a size"),
        (["--runtime", "/usr/bin/busybox", "--threads", "0"], 2, "thread count 0"),
        (["--runtime", "/usr/bin/busybox", "--dlopen", "maybe"], 2, "dlopen mode 'maybe'"),
    ],
)
def test_measure_errors_are_one_clear_sentence(run, args: list[str], code: int, message: str) -> None:
    r = run("enclave", "measure", *args)
    assert r.code == code
    assert r.err.startswith("sconify: error: ") and message in r.err
    assert "Traceback" not in r.err


# --- keys -------------------------------------------------------------------------------------------


def test_keys_generate_writes_0600_and_reports_mrsigner(run, tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    r = run("keys", "generate", "--enclave", path, "--json")
    assert r.code == 0, r.err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [row] = r.json()
    assert row["kind"] == "enclave" and row["path"] == str(path) and row["encrypted"] is False
    assert row["mrsigner"] == hashlib.sha256(_modulus_le(path)).hexdigest()
    again = run("keys", "generate", "--enclave", path)
    assert again.code == 12 and "already exists" in again.err
    forced = run("keys", "generate", "--enclave", path, "--force", "--json")
    assert forced.code == 0 and forced.json()[0]["mrsigner"] != row["mrsigner"]


def test_keys_generate_needs_a_kind(run) -> None:
    r = run("keys", "generate")
    assert r.code == 2 and "sconify keys generate --enclave key.pem" in r.err


def test_keys_generate_encrypts_with_the_passphrase_file(run, tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("hunter2\n")
    path = tmp_path / "k.pem"
    r = run("keys", "generate", "--enclave", path, "--passphrase-file", secret, "--json")
    assert r.code == 0 and r.json()[0]["encrypted"] is True
    key = serialization.load_pem_private_key(path.read_bytes(), b"hunter2")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072


# --- sign, show, verify -----------------------------------------------------------------------------


def test_sign_verify_show(run, files: dict[str, Path], key_file: Path, tmp_path: Path) -> None:
    sig = tmp_path / "enclave.sig"
    sgxs = tmp_path / "enclave.sgxs"
    measured = run("enclave", "measure", *_enclave_args(files, "--debug"), "--sgxs", sgxs, "--json").json()
    r = run("enclave", "sign", *_enclave_args(files, "--debug"), "--key", key_file, "--out", sig,
            "--date", "20240229", "--isvprodid", "42", "--isvsvn", "5")
    assert r.code == 0, r.err
    assert sig.stat().st_size == 1808
    v = run("enclave", "verify", sig, "--sgxs", sgxs)
    assert v.code == 0, v.err
    shown = run("enclave", "show", sig, "--json")
    assert shown.code == 0
    info = shown.json()
    assert info["mrenclave"] == measured["mrenclave"]
    assert info["mrsigner"] == hashlib.sha256(_modulus_le(key_file)).hexdigest()
    assert (info["debug"], info["isvprodid"], info["isvsvn"], info["date"]) == (True, 42, 5, "2024-02-29")
    people = run("enclave", "show", sig)
    assert f"mrsigner:       {info['mrsigner']}" in people.out and "debug:          yes" in people.out


def test_signing_is_reproducible(run, files: dict[str, Path], key_file: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a.sig", tmp_path / "b.sig"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # 2023-11-14
    assert run("enclave", "sign", *_enclave_args(files), "--key", key_file, "--out", a).code == 0
    assert run("enclave", "sign", *_enclave_args(files), "--key", key_file, "--out", b).code == 0
    assert a.read_bytes() == b.read_bytes()
    assert run("enclave", "show", a, "--json").json()["date"] == "2023-11-14"


def test_verify_fails_for_another_enclave_or_a_changed_signature(run, files: dict[str, Path], key_file: Path,
                                                                 tmp_path: Path) -> None:
    sig, other = tmp_path / "e.sig", tmp_path / "other.sgxs"
    assert run("enclave", "sign", *_enclave_args(files), "--key", key_file, "--out", sig).code == 0
    run("enclave", "measure", *_enclave_args(files, "--heap", "128M"), "--sgxs", other)
    mismatch = run("enclave", "verify", sig, "--sgxs", other, "--json")
    assert mismatch.code == 13
    assert mismatch.json()["sgxs_matches"] is False and mismatch.json()["signature_valid"] is True
    assert "not the signed MRENCLAVE" in mismatch.err
    broken = bytearray(sig.read_bytes())
    broken[1026] ^= 1  # ISVSVN
    sig.write_bytes(bytes(broken))
    bad = run("enclave", "verify", sig)
    assert bad.code == 13 and "the RSA signature does not verify" in bad.err
    assert run("enclave", "show", sig, "--json").json()["signature_valid"] is False


def test_malformed_files_are_refused(run, key_file: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 1000)
    r = run("enclave", "show", junk)
    assert r.code == 7 and "not the 1808 bytes of a SIGSTRUCT" in r.err
    r = run("enclave", "sign", "--sgxs", junk, "--key", key_file, "--out", tmp_path / "x.sig")
    assert r.code == 7 and "is not a valid SGXS stream" in r.err
    r = run("enclave", "verify", key_file)
    assert r.code == 7
    data = tmp_path / "data.bin"
    data.write_bytes(b"\x01" * 256)
    r = run("enclave", "import-signature", "--data", data, "--signature", junk, "--public-key", key_file,
            "--out", tmp_path / "y.sig")
    assert r.code == 7 and "not a valid SIGSTRUCT: its header bytes" in r.err


def test_sign_from_mrenclave_with_debug(run, key_file: Path, tmp_path: Path) -> None:
    sig = tmp_path / "m.sig"
    value = hashlib.sha256(b"x").hexdigest()
    r = run("enclave", "sign", "--mrenclave", value, "--debug", "--key", key_file, "--out", sig, "--json")
    assert r.code == 0, r.err
    assert r.json()["mrenclave"] == value and r.json()["debug"] is True
    assert run("enclave", "verify", sig).code == 0


def test_settings_with_a_given_mrenclave_are_refused(run, key_file: Path, tmp_path: Path) -> None:
    r = run("enclave", "sign", "--mrenclave", "00" * 32, "--heap", "1G", "--key", key_file,
            "--out", tmp_path / "x.sig")
    assert r.code == 2 and "--heap only apply when measuring" in r.err
    r = run("enclave", "sign", "--mrenclave", "abc", "--key", key_file, "--out", tmp_path / "x.sig")
    assert r.code == 2 and "not 64 hex digits" in r.err


def test_sign_with_a_wrong_key_says_how_to_make_one(run, tmp_path: Path) -> None:
    small = tmp_path / "small.pem"
    small.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    r = run("enclave", "sign", "--mrenclave", "00" * 32, "--key", small, "--out", tmp_path / "x.sig")
    assert r.code == 10
    assert "RSA-3072 with exponent 3" in r.err and "sconify keys generate --enclave key.pem" in r.err
    assert not (tmp_path / "x.sig").exists()


def test_sign_with_an_encrypted_key(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    key = tmp_path / "k.pem"
    assert run("keys", "generate", "--enclave", key, "--passphrase-file", secret).code == 0
    out = tmp_path / "x.sig"
    missing = run("enclave", "sign", "--mrenclave", "11" * 32, "--key", key, "--out", out)
    assert missing.code == 10 and "is encrypted" in missing.err
    assert run("enclave", "sign", "--mrenclave", "11" * 32, "--key", key, "--out", out,
               "--passphrase-file", secret).code == 0
    monkeypatch.setenv("SCONIFY_ENCLAVE_KEY_PASSPHRASE", "s3cret")
    assert run("enclave", "sign", "--mrenclave", "11" * 32, "--key", key, "--out", out).code == 0


# --- two-step signing -------------------------------------------------------------------------------


def test_two_step_signing_with_openssl_as_the_outside_signer(run, files: dict[str, Path], key_file: Path,
                                                             tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    data, digest, signature = tmp_path / "data.bin", tmp_path / "digest.bin", tmp_path / "signature.bin"
    common = [*_enclave_args(files), "--date", "20240501", "--isvsvn", "2"]
    r = run("enclave", "export-signing-data", *common, "--out", data, "--digest-out", digest, "--json")
    assert r.code == 0, r.err
    assert len(data.read_bytes()) == 256
    assert digest.read_bytes() == hashlib.sha256(data.read_bytes()).digest() == bytes.fromhex(r.json()["digest"])
    subprocess.run([openssl, "dgst", "-sha256", "-sign", str(key_file), "-out", str(signature), str(data)],
                   check=True)
    public = tmp_path / "public.pem"
    subprocess.run([openssl, "rsa", "-in", str(key_file), "-pubout", "-out", str(public)], check=True,
                   capture_output=True)
    two_step = tmp_path / "two-step.sig"
    r = run("enclave", "import-signature", "--data", data, "--signature", signature, "--public-key", public,
            "--out", two_step)
    assert r.code == 0, r.err
    direct = tmp_path / "direct.sig"
    assert run("enclave", "sign", *common, "--key", key_file, "--out", direct).code == 0
    assert two_step.read_bytes() == direct.read_bytes()
    assert run("enclave", "verify", two_step).code == 0


def test_import_refuses_a_signature_that_does_not_verify(run, key_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    assert run("enclave", "export-signing-data", "--mrenclave", "22" * 32, "--out", data).code == 0
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(os.urandom(384))
    out = tmp_path / "out.sig"
    r = run("enclave", "import-signature", "--data", data, "--signature", wrong, "--public-key", key_file,
            "--out", out)
    assert r.code == 13 and "does not verify" in r.err
    assert not out.exists()
