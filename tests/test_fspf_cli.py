"""``sconify fs protect | verify | decrypt | show`` as a user runs them: output, files and exit codes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sconify.cli import main

CHUNK = "4096"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["-q", *argv])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "app" / "main.py").write_bytes(b"print('hi')\n" * 2000)
    (root / "app" / "empty").write_bytes(b"")
    (root / "usr" / "lib" / "libx.so").write_bytes(os.urandom(10000))
    (root / "README").write_bytes(b"plain")
    return root


def protect(capsys: pytest.CaptureFixture[str], src: Path, out: Path, *extra: str) -> dict[str, str]:
    code, stdout, err = run(
        capsys,
        "fs",
        "protect",
        str(src),
        str(out),
        "--region",
        "encrypted:/app",
        "--region",
        "authenticated:/usr/lib",
        "--chunk-size",
        CHUNK,
        "--json",
        *extra,
    )
    assert code == 0, err
    return json.loads(stdout)


def test_protect_prints_key_and_tag_and_verify_accepts_them(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path
) -> None:
    code, stdout, _ = run(capsys, "fs", "protect", str(src), str(tmp_path / "out"), "--region", "encrypted:/app")
    assert code == 0
    fields = dict(line.split(": ", 1) for line in stdout.splitlines())
    key, tag = fields["key"].strip(), fields["tag"].strip()
    assert len(bytes.fromhex(key)) == 32 and len(bytes.fromhex(tag)) == 16
    code, stdout, _ = run(capsys, "fs", "verify", str(tmp_path / "out"), "--key", key, "--tag", tag)
    assert code == 0 and "ok" in stdout and tag in stdout


def test_json_output_has_key_and_tag(capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    result = protect(capsys, src, tmp_path / "out")
    assert len(bytes.fromhex(result["key"])) == 32 and len(bytes.fromhex(result["tag"])) == 16
    assert result["files"] == 3


def test_keys_out_writes_a_private_file_and_keeps_the_key_off_stdout(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    result = protect(capsys, src, tmp_path / "out", "--keys-out", str(keys))
    assert "key" not in result
    saved = json.loads(keys.read_text())
    assert saved["tag"] == result["tag"] and len(bytes.fromhex(saved["key"])) == 32
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keys")] == []  # no temp file left
    code, _, _ = run(capsys, "fs", "verify", str(tmp_path / "out"), "--key-file", str(keys))
    assert code == 0


def test_the_same_key_gives_the_same_tag(capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    key = "11" * 32
    one = protect(capsys, src, tmp_path / "one", "--key", key)
    two = protect(capsys, src, tmp_path / "two", "--key", key, "--workers", "1")
    assert one["tag"] == two["tag"] and one["key"] == key


def test_verify_lists_each_tampered_path_and_exits_13(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path
) -> None:
    result = protect(capsys, src, tmp_path / "out")
    out = tmp_path / "out"
    with open(out / "app" / "main.py", "r+b") as handle:
        handle.seek(5000)
        byte = handle.read(1)[0]
        handle.seek(5000)
        handle.write(bytes([byte ^ 0xFF]))  # a change whatever the (random) ciphertext held there
    (out / "usr" / "lib" / "evil.so").write_bytes(b"evil")
    code, stdout, err = run(capsys, "fs", "verify", str(out), "--key", result["key"], "--tag", result["tag"], "--json")
    assert code == 13
    report = json.loads(stdout)
    assert report["ok"] is False
    assert {(p["path"], p["kind"]) for p in report["problems"]} == {
        ("/app/main.py", "tampered-chunk"),
        ("/usr/lib/evil.so", "unexpected"),
    }
    assert err.startswith("sconify: error:") and "/app/main.py" in err and "Traceback" not in err
    code, stdout, _ = run(capsys, "fs", "verify", str(out), "--key", result["key"], "--tag", result["tag"])
    assert code == 13 and "/usr/lib/evil.so" in stdout and "unexpected" in stdout


def test_decrypt_writes_the_plain_tree(capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    result = protect(capsys, src, tmp_path / "out")
    code, _, err = run(
        capsys,
        "fs",
        "decrypt",
        str(tmp_path / "out"),
        str(tmp_path / "plain"),
        "--key",
        result["key"],
        "--tag",
        result["tag"],
    )
    assert code == 0, err
    for path in ("app/main.py", "app/empty", "usr/lib/libx.so", "README"):
        assert (tmp_path / "plain" / path).read_bytes() == (src / path).read_bytes()
    assert not (tmp_path / "plain" / ".sconify").exists()


def test_decrypt_of_a_tampered_volume_writes_nothing(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path
) -> None:
    result = protect(capsys, src, tmp_path / "out")
    os.truncate(tmp_path / "out" / "usr" / "lib" / "libx.so", 100)
    code, _, err = run(
        capsys,
        "fs",
        "decrypt",
        str(tmp_path / "out"),
        str(tmp_path / "plain"),
        "--key",
        result["key"],
        "--tag",
        result["tag"],
    )
    assert code == 7 and "/usr/lib/libx.so" in err and "truncated" in err
    assert not (tmp_path / "plain").exists()
    assert [p for p in tmp_path.iterdir() if "fspf-tmp" in p.name] == []


def test_show_lists_regions_and_records(capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    result = protect(capsys, src, tmp_path / "out")
    code, stdout, _ = run(capsys, "fs", "show", str(tmp_path / "out"), "--key", result["key"], "--json")
    assert code == 0
    shown = json.loads(stdout)
    assert shown["tag"] == result["tag"] and shown["chunk_size"] == int(CHUNK)
    assert shown["regions"] == [
        {"prefix": "/", "mode": "not-protected"},
        {"prefix": "/app", "mode": "encrypted"},
        {"prefix": "/usr/lib", "mode": "authenticated"},
    ]
    by_path = {r["path"]: r for r in shown["records"]}
    assert set(by_path) == {"/app", "/app/main.py", "/app/empty", "/usr/lib", "/usr/lib/libx.so"}
    assert by_path["/app/main.py"]["size"] == 24000 and by_path["/app/main.py"]["chunks"] == 6
    code, stdout, _ = run(capsys, "fs", "show", str(tmp_path / "out"), "--key", result["key"])
    assert code == 0 and "/usr/lib/libx.so" in stdout and "authenticated" in stdout


def test_the_key_can_come_from_the_environment(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = protect(capsys, src, tmp_path / "out")
    monkeypatch.setenv("SCONIFY_FSPF_KEY", result["key"])
    monkeypatch.setenv("SCONIFY_FSPF_TAG", result["tag"])
    code, _, _ = run(capsys, "fs", "verify", str(tmp_path / "out"))
    assert code == 0


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"key": "22" * 32}, 10, "another key"),
        ({"key": "zz"}, 10, "not hexadecimal"),
        ({"key": "12" * 16}, 10, "32 bytes"),
        ({"tag": "00" * 16}, 7, "another state"),
        ({"tag": "00"}, 10, "32 hex digits"),
        ({"tag": None}, 2, "expected volume tag"),
    ],
)
def test_bad_keys_and_tags_end_with_one_clear_sentence(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path, change: dict[str, str | None], code: int, words: str
) -> None:
    result = {**protect(capsys, src, tmp_path / "out"), **change}
    argv = ["fs", "verify", str(tmp_path / "out"), "--key", str(result["key"])]
    if result["tag"] is not None:
        argv += ["--tag", str(result["tag"])]
    got, _, err = run(capsys, *argv)
    assert got == code
    assert words in err and err.count("\n") == 1 and err.startswith("sconify: error: ")


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["--region", "secret:/app"], 2, "Unknown region mode"),
        (["--region", "encrypted:app"], 2, "must be absolute"),
        (["--region", "not-protected:/app"], 2, "No region is encrypted"),
        (["--region", "encrypted:/a", "--region", "authenticated:/a/"], 2, "given twice"),
        (["--region", "encrypted:/", "--chunk-size", "1000"], 2, "power of two"),
    ],
)
def test_bad_protect_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path, argv: list[str], code: int, words: str
) -> None:
    got, _, err = run(capsys, "fs", "protect", str(src), str(tmp_path / "out"), *argv)
    assert got == code and words in err
    assert not (tmp_path / "out").exists()


def test_protect_refuses_an_existing_output(capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_bytes(b"")
    code, _, err = run(capsys, "fs", "protect", str(src), str(tmp_path / "out"), "--region", "encrypted:/")
    assert code == 12 and "not empty" in err


def test_verify_of_a_directory_without_a_volume(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    code, _, err = run(capsys, "fs", "verify", str(src), "--key", "11" * 32, "--tag", "22" * 16)
    assert code == 4 and "no metadata file" in err
