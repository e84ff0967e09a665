"""Rule files: the shipped set validates, bad files are reported by file and line, user rules take precedence."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from sconify.cli import cli
from sconify.errors import UsageError
from sconify.rules import check_dir, load_rules, parse_size, shipped_rules_dir
from sconify.rules.loader import parse_rule_text

REQUIRED = {"default", "python", "node", "java", "ruby", "perl", "php", "shell", "nginx", "redis", "postgres"}


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_rules_are_valid_and_complete() -> None:
    rules, issues = check_dir(shipped_rules_dir())
    assert issues == []
    assert REQUIRED <= {r.name for r in rules}


def test_shipped_default_rule_protects_root_and_leaves_runtime_files_alone() -> None:
    default = load_rules().get("default")
    assert default is not None
    modes = {r.path: r.mode for r in default.regions}
    assert modes["/"] == "authenticated"
    for path in ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/proc", "/sys", "/dev", "/tmp", "/run",
                 "/var/run", "/var/tmp"):
        assert modes[path] == "not-protected", path
    assert modes["${app}"] == "encrypted"
    assert modes["${libraries}"] == "authenticated"


def test_unknown_key_is_reported_with_its_line() -> None:
    text = "name: x\nregions:\n  - path: /a\n    mode: encrypted\n    reason: r\n    colour: blue\n"
    data, issues = parse_rule_text(text, "x.yaml")
    assert data is None
    assert len(issues) == 1
    assert issues[0].line == 6
    assert "'colour' is not a known key" in issues[0].message
    assert str(issues[0]).startswith("x.yaml:6: ")


def test_bad_mode_names_the_allowed_values_and_line() -> None:
    text = "name: x\nregions:\n  - path: /a\n    mode: secret\n    reason: r\n"
    _, issues = parse_rule_text(text, "x.yaml")
    assert [(i.line, "'secret' is not one of encrypted, authenticated, not-protected" in i.message)
            for i in issues] == [(4, True)]


def test_yaml_syntax_error_has_a_line() -> None:
    _, issues = parse_rule_text("name: x\nregions: [\n  - oops: [\n", "bad.yaml")
    assert len(issues) == 1 and issues[0].line is not None and "not valid YAML" in issues[0].message


def test_missing_name_empty_file_and_non_mapping() -> None:
    assert "'name' is a required property" in parse_rule_text("priority: 3\n", "a.yaml")[1][0].message
    assert "empty" in parse_rule_text("", "b.yaml")[1][0].message
    assert "mapping" in parse_rule_text("- a\n- b\n", "c.yaml")[1][0].message


def test_duplicate_keys_and_unknown_variables_are_reported() -> None:
    _, dup = parse_rule_text("name: x\nname: y\n", "d.yaml")
    assert dup[0].line == 2 and "appears twice" in dup[0].message
    text = "name: x\nregions:\n  - path: ${nosuch}/conf\n    mode: encrypted\n    reason: r\n"
    _, var = parse_rule_text(text, "v.yaml")
    assert var[0].line == 3 and "unknown variable ${nosuch}" in var[0].message
    ok = "name: x\nregions:\n  - path: ${code.anything}/conf\n    mode: encrypted\n    reason: r\n"
    assert parse_rule_text(ok, "ok.yaml")[1] == []


def test_sizes() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("512KiB") == 512 << 10
    assert parse_size(8192) == 8192
    with pytest.raises(ValueError):
        parse_size("lots")
    _, issues = parse_rule_text("name: x\nenclave:\n  heap: 12 parsecs\n", "s.yaml")
    assert issues and issues[0].line == 3


def test_same_name_in_one_directory_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "name: same\n")
    _write(tmp_path, "b.yaml", "name: same\n")
    _, issues = check_dir(tmp_path)
    assert len(issues) == 1 and "also used by" in issues[0].message and issues[0].file.endswith("b.yaml")


def test_user_rule_replaces_shipped_rule_of_the_same_name(tmp_path: Path) -> None:
    _write(tmp_path, "python.yaml", """\
        name: python
        match:
          interpreter: python
        enclave:
          heap: 3G
        """)
    ruleset = load_rules([tmp_path])
    python = ruleset.get("python")
    assert python is not None and python.enclave.heap == 3 << 30 and python.rank == 1
    assert [n for n, _, _ in ruleset.replaced] == ["python"]
    assert ruleset.names().count("python") == 1
    # user rules come after every shipped rule, so they win conflicts
    assert ruleset.names()[-1] == "python"


def test_later_user_directory_wins(tmp_path: Path) -> None:
    _write(tmp_path / "one", "site.yaml", "name: site\nenclave:\n  threads: 8\n")
    _write(tmp_path / "two", "site.yaml", "name: site\nenclave:\n  threads: 12\n")
    ruleset = load_rules([tmp_path / "one", tmp_path / "two"])
    site = ruleset.get("site")
    assert site is not None and site.enclave.threads == 12 and site.rank == 2


def test_invalid_user_directory_stops_loading_with_the_first_issue(tmp_path: Path) -> None:
    _write(tmp_path, "bad.yaml", "name: Bad Name\n")
    with pytest.raises(UsageError) as err:
        load_rules([tmp_path])
    assert "bad.yaml:1" in str(err.value) and "sconify rules check" in str(err.value)
    with pytest.raises(UsageError):
        load_rules([tmp_path / "does-not-exist"])


def test_rules_check_command_lists_file_and_line_and_exits_2(tmp_path: Path) -> None:
    _write(tmp_path, "good.yaml", "name: good\n")
    _write(tmp_path, "bad.yaml", "name: bad\nregions:\n  - path: relative/path\n    mode: encrypted\n    reason: r\n")
    result = CliRunner().invoke(cli, ["rules", "check", str(tmp_path)], standalone_mode=False, catch_exceptions=True)
    assert isinstance(result.exception, UsageError) and result.exception.exit_code == 2
    assert f"{tmp_path / 'bad.yaml'}:3: regions/0/path: 'relative/path'" in result.output


def test_rules_check_command_accepts_the_shipped_rules() -> None:
    result = CliRunner().invoke(cli, ["rules", "check", str(shipped_rules_dir())], standalone_mode=False)
    assert result.exception is None
    assert "rules ok" in result.output


def test_rules_list_and_show(tmp_path: Path) -> None:
    _write(tmp_path, "nginx.yaml", "name: nginx\ndescription: my nginx\n")
    listed = CliRunner().invoke(cli, ["rules", "list", "--rules", str(tmp_path)], standalone_mode=False)
    assert listed.exception is None
    line = next(row for row in listed.output.splitlines() if row.startswith("nginx "))
    assert "--rules #1" in line and "my nginx" in line
    shown = CliRunner().invoke(cli, ["rules", "show", "nginx", "--rules", str(tmp_path)], standalone_mode=False)
    assert "description: my nginx" in shown.output


def test_a_built_package_carries_the_shipped_rules_and_finds_them(tmp_path: Path) -> None:
    """A wheel has no top-level rules/ beside the package: the build copies them to sconify/data/rules."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")], cwd=root,
                   check=True, capture_output=True, timeout=120)
    built = tmp_path / "lib" / "sconify" / "data" / "rules"
    shipped = sorted(p.name for p in (root / "rules").glob("*.yaml"))
    assert shipped and sorted(p.name for p in built.glob("*.yaml")) == shipped
    for name in shipped:
        assert (built / name).read_bytes() == (root / "rules" / name).read_bytes()
    # Imported from the built tree (not the source tree), the loader finds and reads them.
    probe = ("import sconify.rules.loader as l; from sconify.rules import load_rules; "
             "print(l.shipped_rules_dir()); print(len(load_rules().rules))")
    out = subprocess.run([sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "lib"), "PATH": "/usr/bin:/bin"}, timeout=60, check=True)
    where, count = out.stdout.split()
    assert Path(where) == built and int(count) == len(shipped)
