"""The session's command becomes argv as Python's shlex.split makes it, and host arguments go only into @@N.

The application ``/app/args.sh`` prints each of its arguments followed by a NUL byte, so the test sees the
exact argv the launcher executed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from test_runtime_support import (  # noqa: F401 (runtime_binary is a fixture)
    EXIT_BAD_SESSION,
    EXIT_HOST_ARGS,
    ProtectedRoot,
    make_source_tree,
    protect_tree,
    require_chroot,
    run_chroot,
    runtime_binary,
    service,
    stderr_line,
    write_session,
)

PREFIX = "/bin/sh /app/args.sh "


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, runtime_binary: Path) -> ProtectedRoot:  # noqa: F811
    require_chroot()
    base = tmp_path_factory.mktemp("runtime-command")
    return protect_tree(make_source_tree(base, runtime_binary), base / "root", runtime_binary)


def argv_of(app: ProtectedRoot, command: str, host: list[str] | None = None) -> list[str]:
    write_session(app, [service(app, command=command)])
    done = run_chroot(app.root, app.env, host or [])
    assert done.returncode == 0, done.stderr
    return [part.decode() for part in done.stdout.split(b"\0")[:-1]]


SPLIT_CASES = [
    "plain words here",
    "'single quoted  spaces'",
    "\"double quoted\"  mixed'single'",
    r"back\ slash\ escaped",
    r'"escaped \" quote and \\ backslash and \n kept"',
    r"'no \escape in single quotes'",
    "''",
    'a "" b',
    "tab\tseparated\nnewline\rcarriage",
    "  leading and trailing  ",
    "unicode é ü 字",
    r"mixed\"quo\"ted'it'\''s'",
    "$HOME `cmd` *glob* ~user $(no expansion)",
    "#not-a-comment x#y",
    r"a\\b \a\b",
    "x='1 2' y=\"3 4\"",
    "@@not-a-placeholder",
    'a"b c"d',
]


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_command_splits_like_shlex(app: ProtectedRoot, case: str) -> None:
    assert argv_of(app, PREFIX + case) == shlex.split(PREFIX + case)[2:]


@pytest.mark.parametrize("case", ["'unclosed", '"unclosed', "trailing\\", '"escaped end\\"'])
def test_commands_shlex_cannot_split_are_refused(app: ProtectedRoot, case: str) -> None:
    with pytest.raises(ValueError):
        shlex.split(PREFIX + case)
    write_session(app, [service(app, command=PREFIX + case)])
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_BAD_SESSION
    assert "cannot be split" in stderr_line(done)


@pytest.mark.parametrize(
    ("command", "host", "expected"),
    [
        ("@@1 @@2", ["only"], ["only"]),
        ("x@@1y -@@2-", [], ["xy", "--"]),
        ("@@1 @@2", ["a b 'c'", ""], ["a b 'c'", ""]),
        ("@@1 @@2", ["@@2", "z"], ["@@2", "z"]),
        ("--name=@@1 @@1", ["n"], ["--name=n", "n"]),
        ("@@10 @@2", ["1", "2", "3", "4", "5", "6", "7", "8", "9", "ten"], ["ten", "2"]),
    ],
)
def test_host_arguments_fill_placeholders(app: ProtectedRoot, command: str, host: list[str],
                                          expected: list[str]) -> None:
    assert argv_of(app, PREFIX + command, host) == expected


@pytest.mark.parametrize(
    ("command", "host", "named"),
    [
        ("fixed", ["extra"], "'extra'"),
        ("@@1", ["one", "two"], "'two'"),
        ("@@0 @@x", ["x"], "'x'"),
    ],
)
def test_host_arguments_beyond_the_placeholders_are_refused(app: ProtectedRoot, command: str, host: list[str],
                                                            named: str) -> None:
    write_session(app, [service(app, command=PREFIX + command)])
    done = run_chroot(app.root, app.env, host)
    assert done.returncode == EXIT_HOST_ARGS
    line = stderr_line(done)
    assert "host arguments refused" in line and named in line
    assert done.stdout == b""


def test_the_program_itself_can_come_from_the_host(app: ProtectedRoot) -> None:
    write_session(app, [service(app, command="@@1 @@2")])
    done = run_chroot(app.root, app.env, ["echo", "from the host"])
    assert (done.returncode, done.stdout) == (0, b"from the host\n")
    done = run_chroot(app.root, app.env)
    assert done.returncode == EXIT_HOST_ARGS
    assert "none were given" in stderr_line(done)
