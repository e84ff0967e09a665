"""The analyzer on the fixture images: every edge case of the issue, judged by the facts each image is built to
show (fixtures/images.py), by skopeo/umoci where they can judge, and by the JSON schema."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from fixture_images import fixture_image_fixture

from sconify.analyze import Analysis, analyze
from sconify.analyze.analysis import MAX_ROUNDS
from sconify.analyze.report import render_text
from sconify.analyze.schema import ANALYSIS_SCHEMA
from sconify.cli import cli
from sconify.errors import ConversionError, UnsupportedError
from sconify.image.model import Platform

fixture_image = fixture_image_fixture()

EDGE_CASES = [
    "busybox-sh", "dynamic-c", "python-app", "distroless", "entry-two-symlinks", "env-shebang", "multi-entry-cmd",
    "shell-form", "missing-lib", "aarch64", "symlink-loop", "no-command", "wrapper-exec", "setuid", "secret-env",
]
_CACHE: dict[str, tuple[Any, Analysis]] = {}


@pytest.fixture
def analyzed(fixture_image):  # type: ignore[no-untyped-def]
    """``analyzed(name)`` -> (build result, Analysis), each image analyzed once per session."""

    def get(name: str) -> tuple[Any, Analysis]:
        if name not in _CACHE:
            built = fixture_image(name)
            _CACHE[name] = (built, analyze(built.open(), source=built.reference))
        return _CACHE[name]

    return get


def _codes(items: Any) -> list[str]:
    return [i.code for i in items]


def _steps(a: Analysis, kind: str) -> list[tuple[str, str]]:
    return [(s.path, s.detail) for s in a.chain if s.kind == kind]


def _mode(a: Analysis, path: str) -> str:
    region = a.mode_of(path)
    assert region is not None
    return region.mode


@pytest.mark.parametrize("name", EDGE_CASES)
def test_argv_is_docker_s_and_json_follows_the_schema(analyzed, name: str) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed(name)
    assert list(a.argv) == built.facts["argv"]
    document = json.loads(json.dumps(a.to_json()))
    jsonschema.validate(document, ANALYSIS_SCHEMA)
    assert document["schema_version"] == 1
    assert document["digest"] == built.digest
    assert document["convertible"] == (not document["problems"])
    # every analysis proposes a root region and a complete set of enclave settings
    assert a.regions[0].path == "/" and a.regions[0].mode == "authenticated"


def test_busybox_script_runs_under_the_shell_and_app_is_encrypted(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("busybox-sh")
    assert a.convertible
    assert a.executable == "/bin/busybox"  # /bin/sh -> busybox
    assert ("/app/run.sh", f"#!{built.facts['interpreter']}") in _steps(a, "shebang")
    assert ("/bin/sh", "-> busybox") in _steps(a, "symlink")
    assert a.interpreter is not None and a.interpreter.kind == "shell" and a.interpreter.script == "/app/run.sh"
    assert list(a.final_argv) == [built.facts["interpreter"], *built.facts["argv"]]
    assert _mode(a, "/app/conf/app.conf") == "encrypted"
    assert _mode(a, "/bin/busybox") == "authenticated"
    assert _mode(a, "/etc/resolv.conf") == "not-protected"
    assert a.elf is not None and a.elf.static and a.elf.machine == "x86-64"
    assert "shell" in a.rules_matched


def test_tree_summary_matches_umoci_unpack(analyzed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("busybox-sh")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{built.layout}:{built.tag}", str(bundle)],
                   check=True, capture_output=True, timeout=120)
    rootfs = bundle / "rootfs"
    files = dirs = links = 0
    for root, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = Path(root, name)
            if path.is_symlink():
                links += 1
            elif path.is_dir():
                dirs += 1
            else:
                files += 1
    assert (a.tree.files, a.tree.directories, a.tree.symlinks) == (files, dirs, links)
    for deleted in built.facts["deleted"]:
        assert not (rootfs / deleted.lstrip("/")).exists()
    assert a.tree.layers[-1].whiteouts >= 2  # the upper layer deletes a file and makes a directory opaque


def test_dynamic_program_libraries_are_resolved_and_user_is_non_root(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("dynamic-c")
    f = built.facts
    assert a.executable == f["executable"] and a.convertible
    assert a.elf is not None
    assert (a.elf.pie, a.elf.static, a.elf.interpreter, list(a.elf.needed)) == \
        (f["pie"], f["static"], f["interp"], f["needed"])
    assert a.elf.libc == "glibc"
    resolved = {lib.name: lib.path for lib in a.elf.libraries}
    assert set(f["needed"]) <= set(resolved) and all(resolved[n] for n in f["needed"])
    assert a.elf.missing == ()
    uid, gid = (int(x) for x in f["user"].split(":"))
    assert (a.user.uid, a.user.gid, a.user.home) == (uid, gid, f["home"])
    for lib in a.elf.libraries:
        assert _mode(a, lib.path) == "authenticated"  # type: ignore[arg-type]
    assert "not-pie" not in _codes(a.warnings)


def test_python_app_found_through_env_and_path(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("python-app")
    f = built.facts
    assert a.convertible
    interpreter = f["interpreter"]  # /usr/bin/python3, a symlink in the image
    assert any(path == interpreter for path, _ in _steps(a, "path-lookup"))
    assert any(path == interpreter for path, _ in _steps(a, "symlink"))
    assert ("/usr/local/bin/app", "#!" + " ".join(f["shebang"])) in _steps(a, "shebang")
    assert a.interpreter is not None
    assert (a.interpreter.kind, a.interpreter.version) == ("python", f["python_version"])
    assert a.interpreter.script == f["argv"][0]
    assert f["stdlib"] in a.interpreter.trees("stdlib")
    assert set(f["app_dirs"]) <= set(a.interpreter.trees("application"))
    for app_dir in f["app_dirs"]:
        assert _mode(a, app_dir + "/main.py") == "encrypted"
    assert _mode(a, f["stdlib"] + "/os.py") == "authenticated"
    assert _mode(a, f["argv"][0]) == "encrypted"
    assert (a.enclave.dlopen, a.enclave.threads) == ("authenticated", 16) and a.enclave.heap >= 1 << 30
    assert ("PYTHONDONTWRITEBYTECODE", "1", "python") in a.environment
    assert "code-not-protected" not in _codes(a.warnings)


def test_env_shebang_with_an_interpreter_argument(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("env-shebang")
    f = built.facts
    assert "env-shebang-arguments" in _codes(a.warnings)
    assert a.interpreter is not None and a.interpreter.kind == "python"
    # the interpreter gets its own argument, then the script, then every argument of the command
    assert list(a.final_argv[1:]) == [*f["interpreter_args"], *f["argv"]]


def test_distroless_static_program_as_non_root(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("distroless")
    f = built.facts
    assert a.convertible and a.executable == f["executable"]
    assert a.elf is not None and a.elf.static == f["static"] and a.elf.libraries == ()
    assert a.user.uid == int(f["user"]) and a.user.name == "nonroot"
    assert a.interpreter is None and a.enclave.heap == 64 << 20
    assert all(s.kind in ("command", "program") for s in a.chain)


def test_entrypoint_through_two_symlinks(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("entry-two-symlinks")
    f = built.facts
    assert a.executable == f["executable"]
    hops = [path for path, _ in _steps(a, "symlink")]
    assert hops == f["symlink_chain"][:-1]
    assert _mode(a, f["executable"]) == "authenticated"
    assert _mode(a, "/opt/app/v1/conf/x") == "encrypted"


def test_multi_item_entrypoint_hands_over_every_argument(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("multi-entry-cmd")
    f = built.facts
    assert _steps(a, "shell-inline")
    # after the shell's exec "$0" "$@" the script runs with all of Cmd's arguments, none lost
    assert list(a.final_argv[-len(f["final_argv"]):]) == f["final_argv"]
    assert a.interpreter is not None and a.interpreter.script == f["final_executable"]


def test_shell_form_cmd(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("shell-form")
    assert a.command.shell_form == built.facts["shell_form"]
    assert a.executable == built.facts["executable"]
    assert a.interpreter is not None and a.interpreter.inline
    assert ("/app/run.sh", "named in the shell command") in _steps(a, "referenced")
    assert "/app/run.sh" in a.scripts and _mode(a, "/app/run.sh") == "encrypted"


def test_wrapper_script_is_followed_into_cmd(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("wrapper-exec")
    f = built.facts
    assert a.executable == f["final_executable"]
    assert list(a.final_argv) == f["final_argv"]
    assert [p for p, _ in _steps(a, "wrapper")] == [f["executable"]]
    assert [p.path for p in a.programs] == ["/bin/busybox", f["final_executable"]]
    assert f["executable"] in a.scripts and _mode(a, f["executable"]) == "encrypted"


def test_missing_library_is_a_problem_naming_it(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("missing-lib")
    assert not a.convertible
    assert _codes(a.problems) == ["missing-library"]
    assert a.elf is not None
    assert [lib.name for lib in a.elf.missing] == built.facts["missing_libraries"]
    for name in built.facts["missing_libraries"]:
        assert name in a.problems[0].message
    error = a.error()
    assert isinstance(error, ConversionError) and error.exit_code == 11


def test_aarch64_is_unsupported(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("aarch64")
    assert not a.convertible
    assert set(_codes(a.problems)) == {"unsupported-architecture"}
    assert a.elf is not None and a.elf.machine == "aarch64"
    assert any(built.facts["executable"] in p.message for p in a.problems)
    error = a.error()
    assert isinstance(error, UnsupportedError) and error.exit_code == 9


def test_symlink_loop_is_a_problem(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("symlink-loop")
    assert _codes(a.problems) == ["symlink-loop"]
    assert " -> ".join(built.facts["symlink_chain"]) in a.problems[0].message
    assert a.executable is None


def test_no_command_is_a_problem(analyzed) -> None:  # type: ignore[no-untyped-def]
    _, a = analyzed("no-command")
    assert _codes(a.problems) == ["no-command"] and a.chain == () and a.executable is None
    assert isinstance(a.error(), ConversionError)


def test_setuid_and_setgid_files_are_warned(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("setuid")
    expected = set(built.facts["setuid"]) | set(built.facts["setgid"])
    assert {w.path for w in a.warnings if w.code == "setuid"} == expected
    assert set(a.tree.setuid) == expected


def test_secret_env_names_are_warned_without_their_values(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("secret-env")
    config = built.open().config["config"]
    values = {e.split("=", 1)[0]: e.split("=", 1)[1] for e in config["Env"]}
    flagged = {w.message.split(" sets ", 1)[1].split(",", 1)[0] for w in a.warnings if w.code == "secret-in-env"}
    assert flagged == set(built.facts["secret_env"])
    text = render_text(a)
    for name in built.facts["secret_env"]:
        assert values[name] not in text
        assert f"{name}=***" in text
        assert all(values[name] not in w.message for w in a.warnings)
    for name in built.facts["plain_env"]:
        assert f"{name}={values[name]}" in text


def test_reads_are_counted_and_each_read_is_a_whole_verified_blob(analyzed) -> None:  # type: ignore[no-untyped-def]
    built, a = analyzed("python-app")
    image = built.open()
    sizes = [layer.descriptor.size for layer in image.layers]
    tars = []
    for layer in image.layers:
        with layer.open_blob() as blob:
            tars.append(len(gzip.decompress(blob.read())))
    r = a.reads
    assert r.header_pass_compressed_bytes == sum(sizes)
    assert r.header_pass_uncompressed_bytes == sum(tars)
    assert all(n >= 1 for n in r.layer_reads) and 1 <= r.rounds <= MAX_ROUNDS
    assert all(n <= 1 + r.rounds for n in r.layer_reads)
    assert r.compressed_bytes == sum(n * s for n, s in zip(r.layer_reads, sizes, strict=True))
    assert r.uncompressed_bytes == sum(n * t for n, t in zip(r.layer_reads, tars, strict=True))
    assert r.files_fetched >= len(a.programs)


def test_an_image_without_a_needed_round_reads_each_layer_once(analyzed) -> None:  # type: ignore[no-untyped-def]
    _, a = analyzed("no-command")
    assert a.reads.rounds == 0 and set(a.reads.layer_reads) == {1}
    assert a.reads.compressed_bytes == a.reads.header_pass_compressed_bytes


def _run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, standalone_mode=False)
    code = getattr(result.exception, "exit_code", 0 if result.exception is None else 70)
    if result.exception is not None and not hasattr(result.exception, "exit_code"):
        raise result.exception
    return code, result.output


@pytest.mark.parametrize(("name", "code"), [
    ("busybox-sh", 0), ("missing-lib", 11), ("symlink-loop", 11), ("no-command", 11), ("aarch64", 9),
])
def test_cli_exit_codes_and_json(fixture_image, name: str, code: int) -> None:  # type: ignore[no-untyped-def]
    built = fixture_image(name)
    status, output = _run_cli(["analyze", built.reference, "--json"])
    assert status == code
    document = json.loads(output)
    jsonschema.validate(document, ANALYSIS_SCHEMA)
    assert document["convertible"] == (code == 0)


def test_cli_report_has_the_sections_people_read(fixture_image) -> None:  # type: ignore[no-untyped-def]
    built = fixture_image("python-app")
    status, output = _run_cli(["analyze", built.reference, "--libraries", "2"])
    assert status == 0
    for section in ("COMMAND", "EXECUTABLE", "ELF", "INTERPRETER", "REGIONS", "ENCLAVE", "WARNINGS", "TREE", "READ"):
        assert f"\n{section}" in output
    assert "... and 3 more" in output  # python3.11 loads 5 libraries, 2 are listed
    assert "convertible:  yes" in output


def test_cli_platform_selection_from_an_index(fixture_image) -> None:  # type: ignore[no-untyped-def]
    built = fixture_image("multiarch")
    status, output = _run_cli(["analyze", built.reference, "--json"])
    assert status == 0 and json.loads(output)["platform"] == "linux/amd64"
    status, output = _run_cli(["analyze", built.reference, "--json", "--platform", "linux/arm64"])
    assert status == 9 and json.loads(output)["platform"] == "linux/arm64"
    arm = analyze(built.open(Platform("linux", "arm64")))
    assert "unsupported-architecture" in _codes(arm.problems)


def test_user_rules_change_the_proposal(fixture_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    built = fixture_image("busybox-sh")
    (tmp_path / "site.yaml").write_text(
        "name: site\nmatch:\n  paths: /app/conf\nregions:\n"
        "  - path: /app/conf\n    mode: authenticated\n    reason: public defaults\n"
        "  - path: ${scripts}\n    mode: not-protected\n    reason: testing the warning\n"
        "enclave:\n  threads: 7\n"
    )
    status, output = _run_cli(["analyze", built.reference, "--json", "--rules", str(tmp_path)])
    assert status == 0
    document = json.loads(output)
    regions = {r["path"]: (r["mode"], r["rule"]) for r in document["regions"]}
    assert regions["/app/conf"] == ("authenticated", "site")
    assert regions["/app/run.sh"] == ("not-protected", "site")
    assert regions["/app"] == ("encrypted", "default")
    assert document["enclave"]["threads"] == 7 and document["enclave"]["rules"]["threads"] == "site"
    assert "site" in document["rules"]["matched"]
    # the image's script now sits in a not-protected region (the user rule wins over the shell rule): say so
    assert any(w["code"] == "code-not-protected" and w["path"] == "/app/run.sh" for w in document["warnings"])


@pytest.mark.registry
def test_analysis_from_a_registry_equals_the_local_one(fixture_image, analyzed, registry,  # type: ignore[no-untyped-def]
                                                        repository_name: str) -> None:
    from infra.images import skopeo

    built, local = analyzed("wrapper-exec")
    ref = registry.ref(repository_name, "v1")
    skopeo("copy", "--dest-tls-verify=false", built.reference, ref)
    status, output = _run_cli(["analyze", ref, "--json"])
    assert status == 0
    remote = json.loads(output)
    mine = json.loads(json.dumps(local.to_json()))
    for key in ("digest", "argv", "executable", "final_argv", "chain", "regions", "enclave", "programs", "tree"):
        assert remote[key] == mine[key], key
    assert remote["reads"]["layer_reads"] == mine["reads"]["layer_reads"]
