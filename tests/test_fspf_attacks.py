"""Every attack of docs/fspf.md section 7 is tried on a protected volume and detected, with the file named.

The volume has an encrypted region /app and an authenticated region /lib; each test changes the stored
volume the way an attacker with write access to the disk (but not the key) could, then checks that
``verify`` reports the path and the kind of failure, and that reading or decrypting refuses.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sconify.errors import IntegrityError, KeyMaterialError
from sconify.fspf import (
    DirectoryVolume,
    FileIntegrityError,
    MetadataTamperedError,
    ProblemKind,
    RegionTable,
    StateMismatchError,
    VolumeKey,
    WrongKeyError,
    protect_directory,
)
from sconify.fspf.format import FORMAT_VERSION, SUITE_HMAC_SIV_AES256GCM, Header, RegionMode, decode_body, encode_body

CHUNK = 4096
META = ".sconify/fspf/volume.fspf"
REGIONS = ["encrypted:/app", "authenticated:/lib"]


def _source(root: Path) -> None:
    (root / "app" / "sub").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "data").mkdir()
    (root / "app" / "a.bin").write_bytes(os.urandom(3 * CHUNK + 100))
    (root / "app" / "b.bin").write_bytes(os.urandom(2 * CHUNK))
    (root / "app" / "twin.bin").write_bytes(os.urandom(3 * CHUNK + 100))  # same size as a.bin
    (root / "app" / "c.txt").write_bytes(b"configuration\n")
    (root / "app" / "sub" / "s.py").write_bytes(b"print(1)\n")
    os.symlink("a.bin", root / "app" / "link")
    (root / "lib" / "x.so").write_bytes(os.urandom(3 * CHUNK))
    (root / "lib" / "y.so").write_bytes(os.urandom(CHUNK // 2))
    (root / "data" / "free.txt").write_bytes(b"not protected")


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, VolumeKey, bytes, Path]:
    """(protected directory, key, tag, source directory)."""
    src = tmp_path / "src"
    src.mkdir()
    _source(src)
    key = VolumeKey.generate()
    result = protect_directory(src, tmp_path / "out", RegionTable.of(REGIONS), key, chunk_size=CHUNK)
    return tmp_path / "out", key, result.tag, src


def _problems(out: Path, key: VolumeKey, tag: bytes) -> dict[str, ProblemKind]:
    with DirectoryVolume(out, key, tag) as volume:
        report = volume.verify(workers=2)
    for problem in report.problems:  # every message names its file
        assert problem.message.startswith(os.fsdecode(problem.path) + ":")
    return {os.fsdecode(p.path): p.kind for p in report.problems}


def _assert_decrypt_refuses(out: Path, key: VolumeKey, tag: bytes, path: str, tmp: Path) -> None:
    with DirectoryVolume(out, key, tag) as volume, pytest.raises(IntegrityError, match=path):
        volume.decrypt_to(tmp / "plain")
    assert not (tmp / "plain").exists()


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def test_the_untouched_volume_verifies(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    assert _problems(out, key, tag) == {}


@pytest.mark.parametrize("path", ["app/a.bin", "lib/x.so"])
@pytest.mark.parametrize("offset", [0, CHUNK + 17, 3 * CHUNK + 99])
def test_a_flipped_byte_is_detected_in_its_chunk(
    volume: tuple[Path, VolumeKey, bytes, Path], tmp_path: Path, path: str, offset: int
) -> None:
    out, key, tag, _ = volume
    if offset >= (out / path).stat().st_size:
        offset = (out / path).stat().st_size - 1
    byte = _read(out / path, offset, 1)
    _patch(out / path, offset, bytes([byte[0] ^ 0x01]))
    assert _problems(out, key, tag) == {"/" + path: ProblemKind.TAMPERED_CHUNK}
    with DirectoryVolume(out, key, tag) as opened:
        report = opened.verify()
        assert f"chunk {offset // CHUNK} " in report.problems[0].detail
        with pytest.raises(FileIntegrityError, match="/" + path):
            opened.read_file("/" + path)
        # chunks before the damaged one still read
        if offset >= CHUNK:
            assert opened.read_range("/" + path, 0, CHUNK) == (volume[3] / path).read_bytes()[:CHUNK]
    _assert_decrypt_refuses(out, key, tag, "/" + path, tmp_path)


@pytest.mark.parametrize("path", ["app/a.bin", "lib/x.so"])
def test_swapped_chunks_within_a_file_are_detected(volume: tuple[Path, VolumeKey, bytes, Path], path: str) -> None:
    out, key, tag, _ = volume
    first, second = _read(out / path, 0, CHUNK), _read(out / path, CHUNK, CHUNK)
    _patch(out / path, 0, second)
    _patch(out / path, CHUNK, first)
    assert _problems(out, key, tag) == {"/" + path: ProblemKind.TAMPERED_CHUNK}


@pytest.mark.parametrize(
    ("victim", "donor"), [("app/a.bin", "app/b.bin"), ("lib/x.so", "app/b.bin"), ("app/a.bin", "lib/x.so")]
)
def test_a_chunk_from_another_file_is_detected(
    volume: tuple[Path, VolumeKey, bytes, Path], victim: str, donor: str
) -> None:
    out, key, tag, _ = volume
    _patch(out / victim, CHUNK, _read(out / donor, CHUNK, CHUNK))
    assert _problems(out, key, tag) == {"/" + victim: ProblemKind.TAMPERED_CHUNK}


def test_two_files_of_the_same_size_swapped_are_both_detected(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    a, twin = (out / "app/a.bin").read_bytes(), (out / "app/twin.bin").read_bytes()
    (out / "app/a.bin").write_bytes(twin)
    (out / "app/twin.bin").write_bytes(a)
    assert _problems(out, key, tag) == {
        "/app/a.bin": ProblemKind.TAMPERED_CHUNK,
        "/app/twin.bin": ProblemKind.TAMPERED_CHUNK,
    }


@pytest.mark.parametrize("path", ["app/a.bin", "lib/x.so"])
def test_a_truncated_file_is_detected(volume: tuple[Path, VolumeKey, bytes, Path], tmp_path: Path, path: str) -> None:
    out, key, tag, _ = volume
    os.truncate(out / path, CHUNK)  # cut exactly at a chunk boundary: every remaining chunk is valid
    assert _problems(out, key, tag) == {"/" + path: ProblemKind.TRUNCATED}
    with DirectoryVolume(out, key, tag) as opened, pytest.raises(FileIntegrityError, match="truncated"):
        opened.read_file("/" + path)
    _assert_decrypt_refuses(out, key, tag, "/" + path, tmp_path)


@pytest.mark.parametrize("path", ["app/b.bin", "lib/x.so"])
def test_an_extended_file_is_detected_even_by_a_whole_valid_chunk(
    volume: tuple[Path, VolumeKey, bytes, Path], path: str
) -> None:
    out, key, tag, _ = volume
    with open(out / path, "ab") as handle:
        handle.write(_read(out / path, 0, CHUNK))
    assert _problems(out, key, tag) == {"/" + path: ProblemKind.EXTENDED}


def test_a_renamed_file_is_missing_at_its_path_and_unexpected_at_the_new_one(
    volume: tuple[Path, VolumeKey, bytes, Path], tmp_path: Path
) -> None:
    out, key, tag, _ = volume
    os.rename(out / "app/c.txt", out / "app/d.txt")
    assert _problems(out, key, tag) == {"/app/c.txt": ProblemKind.MISSING, "/app/d.txt": ProblemKind.UNEXPECTED}
    _assert_decrypt_refuses(out, key, tag, "/app/c.txt", tmp_path)


def test_a_file_renamed_over_another_is_detected(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    os.replace(out / "app/twin.bin", out / "app/a.bin")
    assert _problems(out, key, tag) == {"/app/a.bin": ProblemKind.TAMPERED_CHUNK, "/app/twin.bin": ProblemKind.MISSING}


@pytest.mark.parametrize("path", ["app/c.txt", "lib/y.so", "app/link", "app/sub/s.py"])
def test_a_removed_entry_is_detected(volume: tuple[Path, VolumeKey, bytes, Path], path: str) -> None:
    out, key, tag, _ = volume
    os.unlink(out / path)
    assert _problems(out, key, tag) == {"/" + path: ProblemKind.MISSING}


def test_a_removed_directory_reports_everything_in_it(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    shutil.rmtree(out / "app/sub")
    assert _problems(out, key, tag) == {"/app/sub": ProblemKind.MISSING, "/app/sub/s.py": ProblemKind.MISSING}


@pytest.mark.parametrize("path", ["app/new.py", "lib/evil.so", "app/sub/deeper/x", "app/.hidden"])
def test_an_added_file_in_a_protected_region_is_detected(
    volume: tuple[Path, VolumeKey, bytes, Path], path: str
) -> None:
    out, key, tag, _ = volume
    (out / path).parent.mkdir(parents=True, exist_ok=True)
    (out / path).write_bytes(b"import os; os.system('evil')")
    problems = _problems(out, key, tag)
    assert problems["/" + path] is ProblemKind.UNEXPECTED
    assert set(problems.values()) == {ProblemKind.UNEXPECTED}


def test_additions_outside_protected_regions_are_allowed(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    (out / "data" / "more.txt").write_bytes(b"fine")
    (out / "tmp").mkdir()
    assert _problems(out, key, tag) == {}


def test_a_directory_replaced_by_a_symlink_is_not_followed(
    volume: tuple[Path, VolumeKey, bytes, Path], tmp_path: Path
) -> None:
    out, key, tag, src = volume
    # the attacker keeps a valid copy of the files elsewhere and points the directory there
    shutil.move(out / "app/sub", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", out / "app/sub")
    assert _problems(out, key, tag) == {"/app/sub": ProblemKind.TYPE_CHANGED, "/app/sub/s.py": ProblemKind.MISSING}


def test_a_file_replaced_by_a_directory_is_detected(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    os.unlink(out / "app/c.txt")
    (out / "app/c.txt").mkdir()
    assert _problems(out, key, tag) == {"/app/c.txt": ProblemKind.TYPE_CHANGED}


def test_a_retargeted_symlink_is_detected(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    os.unlink(out / "app/link")
    os.symlink("/etc/shadow", out / "app/link")
    assert _problems(out, key, tag) == {"/app/link": ProblemKind.LINK_CHANGED}


def _protect_again(src: Path, dest: Path, key: VolumeKey, regions: list[str] = REGIONS) -> bytes:
    return protect_directory(src, dest, RegionTable.of(regions), key, chunk_size=CHUNK).tag


def test_an_older_metadata_file_is_a_rollback(volume: tuple[Path, VolumeKey, bytes, Path], tmp_path: Path) -> None:
    out, key, tag, src = volume
    old_metadata = (out / META).read_bytes()
    (src / "app" / "c.txt").write_bytes(b"configuration v2\n")
    new_tag = _protect_again(src, tmp_path / "v2", key)
    assert new_tag != tag
    (tmp_path / "v2" / META).write_bytes(old_metadata)
    with pytest.raises(StateMismatchError, match="rollback"):
        DirectoryVolume(tmp_path / "v2", key, new_tag)


def test_a_whole_older_volume_is_a_rollback(volume: tuple[Path, VolumeKey, bytes, Path], tmp_path: Path) -> None:
    out, key, old_tag, src = volume
    (src / "lib" / "y.so").write_bytes(b"patched library")
    new_tag = _protect_again(src, tmp_path / "v2", key)
    with pytest.raises(StateMismatchError) as caught:
        DirectoryVolume(out, key, new_tag)
    assert caught.value.exit_code == 7
    assert old_tag.hex() in caught.value.message and new_tag.hex() in caught.value.message


def test_a_wrong_key_is_named_as_such(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, _, tag, _ = volume
    with pytest.raises(WrongKeyError, match="another key") as caught:
        DirectoryVolume(out, VolumeKey.generate(), tag)
    assert isinstance(caught.value, KeyMaterialError) and caught.value.exit_code == 10


def test_a_wrong_tag_is_refused(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    wrong = bytes([tag[0] ^ 0x80]) + tag[1:]
    with pytest.raises(StateMismatchError, match="wrong tag"):
        DirectoryVolume(out, key, wrong)


@pytest.mark.parametrize("offset", [64, 100, -1, -17, 12])
def test_a_changed_metadata_file_is_refused(volume: tuple[Path, VolumeKey, bytes, Path], offset: int) -> None:
    out, key, tag, _ = volume
    data = bytearray((out / META).read_bytes())
    data[offset] ^= 0x04  # body, stored tag, last body byte, chunk-size field
    (out / META).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="volume.fspf"):
        DirectoryVolume(out, key, tag)


def test_a_truncated_metadata_file_is_refused(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    data = (out / META).read_bytes()
    (out / META).write_bytes(data[:-20])
    with pytest.raises(IntegrityError, match="truncated"):
        DirectoryVolume(out, key, tag)


def test_a_changed_header_byte_fails_authentication(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    data = bytearray((out / META).read_bytes())
    data[45] ^= 0x01  # inside the metadata nonce: the header is the AAD
    (out / META).write_bytes(bytes(data))
    with pytest.raises(MetadataTamperedError):
        DirectoryVolume(out, key, tag)


def test_encrypted_files_replaced_by_their_plaintext_are_detected(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    """A downgrade of /app to not-protected (or authenticated) on disk: the metadata still says encrypted."""
    out, key, tag, src = volume
    for name in ("a.bin", "b.bin", "c.txt"):
        shutil.copyfile(src / "app" / name, out / "app" / name)
    problems = _problems(out, key, tag)
    assert problems == {f"/app/{n}": ProblemKind.TAMPERED_CHUNK for n in ("a.bin", "b.bin", "c.txt")}


def test_a_volume_protected_with_a_weaker_region_mode_does_not_pass(
    volume: tuple[Path, VolumeKey, bytes, Path], tmp_path: Path
) -> None:
    """Even a key holder who re-protects /app as authenticated gets another tag, and its chunk tags do not
    verify under the encrypted volume's metadata: the mode is part of every file key."""
    out, key, tag, src = volume
    weak_tag = _protect_again(src, tmp_path / "weak", key, ["authenticated:/app", "authenticated:/lib"])
    assert weak_tag != tag
    with pytest.raises(StateMismatchError):
        DirectoryVolume(tmp_path / "weak", key, tag)
    (tmp_path / "weak" / META).write_bytes((out / META).read_bytes())  # keep the strong metadata
    problems = _problems(tmp_path / "weak", key, tag)
    assert set(problems) >= {"/app/a.bin", "/app/b.bin", "/app/c.txt"}
    assert set(problems.values()) == {ProblemKind.TAMPERED_CHUNK}


def test_the_tag_binds_the_region_table(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    """Metadata with /app downgraded, sealed under the right key, still does not match the policy's tag."""
    out, key, tag, _ = volume
    with DirectoryVolume(out, key, tag) as opened:
        original = opened.volume
    body = encode_body(original.regions, original.records, CHUNK)
    parsed = decode_body(body, CHUNK, where="test")
    downgraded = RegionTable.of(["authenticated:/app", "authenticated:/lib"])
    assert downgraded.mode_for(b"/app/a.bin") is RegionMode.AUTHENTICATED
    records = [r for r in parsed.records if not r.path.startswith(b"/app")]
    forged_body = encode_body(downgraded, records, CHUNK)
    header = Header(FORMAT_VERSION, SUITE_HMAC_SIV_AES256GCM, CHUNK, len(forged_body), key.key_id)
    forged, forged_tag = key.seal_metadata(header, forged_body)
    assert forged_tag != tag
    (out / META).write_bytes(forged)
    with pytest.raises(StateMismatchError):
        DirectoryVolume(out, key, tag)


def test_a_deleted_metadata_file_is_reported(volume: tuple[Path, VolumeKey, bytes, Path]) -> None:
    out, key, tag, _ = volume
    (out / META).unlink()
    from sconify.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no metadata file"):
        DirectoryVolume(out, key, tag)
