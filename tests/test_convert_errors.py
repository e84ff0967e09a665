"""Bad input to ``sconify convert``, through the command line: one clear sentence on stderr, the documented exit
code, and no output at all (no policy directory, no image, no staging leftovers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_convert_support import (
    Keys,
    keys,  # noqa: F401 (fixture)
    real_runtime,
    run_cli,
)

from sconify.build.runtime import RUNTIME_ENV


@pytest.fixture(autouse=True)
def runtime_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not real_runtime():
        monkeypatch.setenv(RUNTIME_ENV, "/usr/bin/busybox")
    empty = tmp_path / "docker-config"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))  # no credentials from the machine


def _convert(capsys, source: str, tmp_path: Path, keys: Keys, *extra: str, dest: str | None = None):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    run = run_cli(
        capsys, "-q", "convert", source, dest or f"oci:{work / 'out'}:latest", "--policy-out", str(work / "policy"),
        "--fspf-key", str(keys.fspf), "--enclave-key", str(keys.enclave), "--sign-key", str(keys.cosign_key), *extra,
    )
    return run, work


def _assert_one_error_and_nothing_written(run, work: Path, code: int, *words: str) -> None:
    assert run.code == code, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sconify: error: "), run.stderr
    assert "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0]
    assert run.stdout == ""
    assert list(work.iterdir()) == [], "something was written"


def test_an_image_without_a_command_is_refused(capsys, fixture_image, keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    run, work = _convert(capsys, fixture_image("no-command").reference, tmp_path, keys)
    _assert_one_error_and_nothing_written(run, work, 11, "--command")


def test_an_aarch64_image_is_unsupported(capsys, fixture_image, keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    run, work = _convert(capsys, fixture_image("aarch64").reference, tmp_path, keys)
    _assert_one_error_and_nothing_written(run, work, 9, "arm64")


def test_a_platform_the_index_does_not_offer_is_unsupported(
    capsys, fixture_image, keys: Keys, tmp_path: Path  # noqa: F811
) -> None:
    run, work = _convert(capsys, fixture_image("arm64-only").reference, tmp_path, keys)
    _assert_one_error_and_nothing_written(run, work, 9, "linux/amd64", "--platform")
    run, work = _convert(capsys, fixture_image("multiarch").reference, tmp_path, keys, "--platform", "linux/s390x")
    _assert_one_error_and_nothing_written(run, work, 9, "linux/s390x")


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--sign-key", "missing.key", ("missing.key", "does not exist")),
        ("--sign-key", "ENCLAVE", ("P-256",)),
        ("--enclave-key", "missing.pem", ("missing.pem", "does not exist")),
        ("--fspf-key", "SHORT", ("64 hex digits",)),
    ],
)
def test_a_wrong_or_missing_key_file_is_refused_before_any_work(
    capsys, fixture_image, keys: Keys, tmp_path: Path, option: str, value: str, words: tuple[str, ...]  # noqa: F811
) -> None:
    short = tmp_path / "short.key"
    short.write_text("abcdef\n")
    path = {"ENCLAVE": str(keys.enclave), "SHORT": str(short)}.get(value, str(tmp_path / value))
    run, work = _convert(capsys, fixture_image("busybox-sh").reference, tmp_path, keys, option, path)
    _assert_one_error_and_nothing_written(run, work, 10, *words)


def test_an_encrypted_path_that_does_not_exist_is_refused(
    capsys, fixture_image, keys: Keys, tmp_path: Path  # noqa: F811
) -> None:
    run, work = _convert(capsys, fixture_image("busybox-sh").reference, tmp_path, keys, "--encrypt", "/srv/nothing")
    _assert_one_error_and_nothing_written(run, work, 11, "/srv/nothing", "does not exist")


def test_a_registry_that_refuses_the_push_leaves_nothing(
    capsys, fixture_image, keys: Keys, tmp_path: Path, registry_basic, repository_name: str  # noqa: F811
) -> None:
    run, work = _convert(capsys, fixture_image("busybox-sh").reference, tmp_path, keys,
                         dest=registry_basic.ref(repository_name, "1"))
    _assert_one_error_and_nothing_written(run, work, 5, registry_basic.host)
    assert repository_name not in registry_basic.repositories()


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, fixture_image, keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    source = fixture_image("busybox-sh")
    run, work = _convert(capsys, source.reference, tmp_path, keys, "--dry-run", "--json", "--encrypt", "/etc")
    assert run.code == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["source_digest"] == source.digest
    assert plan["command"] == source.facts["argv"]
    assert next(r for r in plan["regions"] if r["path"] == "/etc")["mode"] == "encrypted"
    assert [la["action"] for la in plan["layers"]][0] == "rewrite"  # the base layer holds /etc
    assert "DB_PASSWORD" in plan["environment"] and "SCONIFY-MARKER" not in run.stdout
    assert list(work.iterdir()) == []
    run_text = run_cli(capsys, "-q", "convert", source.reference, "--dry-run")
    assert run_text.code == 0 and "LAYER" in run_text.stdout and "REGION" in run_text.stdout


def test_a_destination_that_refuses_the_manifest_leaves_no_policy(
    capsys, fixture_image, keys: Keys, tmp_path: Path, registry, repository_name: str  # noqa: F811
) -> None:
    # The blobs are uploaded, then the registry destination refuses to tag a manifest of another digest.
    dest = registry.ref(repository_name, "1") + "@sha256:" + "0" * 64
    run, work = _convert(capsys, fixture_image("busybox-sh").reference, tmp_path, keys, dest=dest)
    _assert_one_error_and_nothing_written(run, work, 12, "drop @DIGEST")
    assert registry.tags(repository_name) == []
