"""How #! lines, env and wrapper scripts are read (the kernel's and the shells' rules)."""

from __future__ import annotations

from sconify.analyze.chain import _split_env_args, _State, ends_in_exec_args, parse_shebang
from sconify.analyze.interpreters import app_root, interpreter_kind


def test_shebang_keeps_the_rest_of_the_line_as_one_argument() -> None:
    assert parse_shebang(b"#!/bin/sh\necho hi\n") == ("/bin/sh", None)
    assert parse_shebang(b"#! /usr/bin/env python3 -u\n") == ("/usr/bin/env", "python3 -u")
    assert parse_shebang(b"#!/usr/bin/perl -w  \r\nprint;\n") == ("/usr/bin/perl", "-w")
    assert parse_shebang(b"#!\t/bin/bash\t-e\n") == ("/bin/bash", "-e")
    assert parse_shebang(b"#!\n") is None
    assert parse_shebang(b"\x7fELF") is None


def test_wrapper_scripts_end_in_exec_of_their_arguments() -> None:
    assert ends_in_exec_args('#!/bin/sh\nset -e\nexec "$@"\n')
    assert ends_in_exec_args('#!/bin/sh\nexec "${@}"\n\n# done\n')
    assert ends_in_exec_args("#!/bin/sh\nexec $@\n")
    assert not ends_in_exec_args('#!/bin/sh\nexec "$@"\necho after\n')
    assert not ends_in_exec_args('#!/bin/sh\nexec nginx "$@"\n')
    assert not ends_in_exec_args("")


def test_env_options_assignments_and_split_string() -> None:
    assert _split_env_args(["-i", "A=1", "B=2", "prog", "x"], _State()) == (["A=1", "B=2"], ["prog", "x"])
    assert _split_env_args(["-u", "HOME", "--", "prog"], _State()) == ([], ["prog"])
    assert _split_env_args(["-S", "python3 -u", "script"], _State()) == ([], ["python3", "-u", "script"])
    assert _split_env_args(["-Spython3 -u"], _State()) == ([], ["python3", "-u"])
    assert _split_env_args([], _State()) == ([], [])


def test_interpreter_kinds_from_invoked_or_real_names() -> None:
    assert interpreter_kind("sh", "/bin/busybox") == "shell"
    assert interpreter_kind("/usr/bin/python3", "/usr/bin/python3.11") == "python"
    assert interpreter_kind("app", "/usr/bin/python3.11") == "python"
    assert interpreter_kind("/usr/bin/env", "/bin/busybox") == "env"
    assert interpreter_kind("php-fpm8.2", "/usr/sbin/php-fpm8.2") == "php"
    assert interpreter_kind("ruby3.1", "/usr/bin/ruby3.1") == "ruby"
    assert interpreter_kind("nodejs", "/usr/bin/nodejs") == "node"
    assert interpreter_kind("nginx", "/usr/sbin/nginx") is None
    assert interpreter_kind("python-config", "/usr/bin/python-config") is None


def test_application_roots() -> None:
    assert app_root("/app/lib/x.py", False) == "/app"
    assert app_root("/opt/vendor/v1/bin/app", False) == "/opt/vendor"
    assert app_root("/usr/src/app/index.js", False) == "/usr/src/app"
    assert app_root("/usr/local/bin/app", False) == "/usr/local/bin/app"
    assert app_root("/docker-entrypoint.sh", False) == "/docker-entrypoint.sh"
    assert app_root("/var/www/html/index.php", False) == "/var/www/html"
    assert app_root("/usr/lib/myapp/run.py", False) == "/usr/lib/myapp"
    assert app_root("/usr/bin", True) is None
    assert app_root("/", True) is None
