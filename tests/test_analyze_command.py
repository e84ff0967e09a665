"""Docker's run-time semantics of an image config: argv from Entrypoint and Cmd, env, PATH, WorkingDir, USER."""

from __future__ import annotations

from sconify.analyze.command import (
    DEFAULT_PATH,
    compose_command,
    join_in_image,
    parse_env,
    resolve_user,
    search_path,
    working_dir,
)

PASSWD = """root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app user:/home/app:/bin/sh
broken line without fields
web:x:33:33:www:/var/www:/usr/sbin/nologin
"""
GROUP = """root:x:0:
app:x:1000:
www-data:x:33:app
audio:x:29:app,web
"""


def test_multi_item_entrypoint_followed_by_multi_item_cmd_keeps_every_argument() -> None:
    cmd = compose_command({"Entrypoint": ["/bin/sh", "-c", 'exec "$0" "$@"'], "Cmd": ["/app/run.sh", "a", "b"]})
    assert cmd.argv == ("/bin/sh", "-c", 'exec "$0" "$@"', "/app/run.sh", "a", "b")
    assert cmd.entrypoint == ("/bin/sh", "-c", 'exec "$0" "$@"')
    assert cmd.cmd == ("/app/run.sh", "a", "b")


def test_cmd_alone_and_entrypoint_alone() -> None:
    assert compose_command({"Cmd": ["python3", "app.py"]}).argv == ("python3", "app.py")
    assert compose_command({"Entrypoint": ["/server"], "Cmd": None}).argv == ("/server",)
    assert compose_command({"Entrypoint": [], "Cmd": ["x"]}).argv == ("x",)


def test_no_entrypoint_and_no_cmd_is_an_empty_command() -> None:
    for config in ({}, {"Entrypoint": None, "Cmd": None}, {"Entrypoint": [], "Cmd": []}):
        assert compose_command(config).empty


def test_empty_and_space_items_are_kept() -> None:
    cmd = compose_command({"Entrypoint": ["/bin/echo", ""], "Cmd": ["a b", " "]})
    assert cmd.argv == ("/bin/echo", "", "a b", " ")


def test_string_entrypoint_is_one_item_not_a_shell_command() -> None:
    # moby's strslice turns a JSON string into a one-item list
    assert compose_command({"Entrypoint": "/bin/run --flag"}).argv == ("/bin/run --flag",)


def test_shell_form_is_recognised_with_the_default_and_a_custom_shell() -> None:
    assert compose_command({"Cmd": ["/bin/sh", "-c", "echo $HOME && /app/run.sh"]}).shell_form
    custom = {"Shell": ["/bin/bash", "-o", "pipefail", "-c"], "Cmd": ["/bin/bash", "-o", "pipefail", "-c", "x | y"]}
    assert compose_command(custom).shell_form
    assert not compose_command({"Cmd": ["/bin/sh", "-c", "x", "y"]}).shell_form
    assert not compose_command({"Cmd": ["/app/server"]}).shell_form


def test_env_later_duplicates_win_and_values_may_hold_equals_signs() -> None:
    env = parse_env(["A=1", "B=x=y", "A=2", "EMPTY=", "NOVALUE"])
    assert env == {"A": "2", "B": "x=y", "EMPTY": "", "NOVALUE": ""}


def test_path_from_env_else_docker_default() -> None:
    assert search_path({"PATH": "/opt/bin:/usr/bin"}) == ("/opt/bin", "/usr/bin")
    assert search_path({}) == tuple(DEFAULT_PATH.split(":"))
    assert search_path({"PATH": ""}) == ("",)


def test_working_dir_defaults_to_root_and_relative_is_flagged() -> None:
    assert working_dir({}) == ("/", True)
    assert working_dir({"WorkingDir": "/app/"}) == ("/app", True)
    assert working_dir({"WorkingDir": "app/x"}) == ("/app/x", False)


def test_join_in_image_stays_inside_the_root() -> None:
    assert join_in_image("/app", "run.sh") == "/app/run.sh"
    assert join_in_image("/app", "/bin/sh") == "/bin/sh"
    assert join_in_image("/", "../../etc/passwd") == "/etc/passwd"
    assert join_in_image("/a/b", "../c") == "/a/c"


def test_empty_user_is_root_with_roots_home() -> None:
    user = resolve_user("", PASSWD, GROUP)
    assert (user.uid, user.gid, user.name, user.home, user.problem) == (0, 0, "root", "/root", None)
    assert user.is_root


def test_named_user_takes_uid_gid_home_and_supplementary_groups() -> None:
    user = resolve_user("app", PASSWD, GROUP)
    assert (user.uid, user.gid, user.name, user.group, user.home) == (1000, 1000, "app", "app", "/home/app")
    assert user.additional_gids == (29, 33)


def test_numeric_user_not_in_passwd_runs_with_gid_zero_and_home_root() -> None:
    user = resolve_user("4242", PASSWD, GROUP)
    assert (user.uid, user.gid, user.name, user.home, user.problem) == (4242, 0, None, "/", None)


def test_numeric_user_in_passwd_takes_its_entry() -> None:
    user = resolve_user("33", PASSWD, GROUP)
    assert (user.uid, user.gid, user.name, user.home) == (33, 33, "web", "/var/www")


def test_user_and_group_forms() -> None:
    assert (resolve_user("app:www-data", PASSWD, GROUP).gid, resolve_user("app:www-data", PASSWD, GROUP).group) \
        == (33, "www-data")
    both = resolve_user("1000:5000", PASSWD, GROUP)
    assert (both.uid, both.gid, both.group, both.additional_gids) == (1000, 5000, None, ())


def test_unknown_user_or_group_is_a_problem() -> None:
    missing = resolve_user("nobody-here", PASSWD, GROUP)
    assert missing.problem and "nobody-here" in missing.problem
    assert missing.uid is None
    no_passwd = resolve_user("app", None, None)
    assert no_passwd.problem and "no /etc/passwd" in no_passwd.problem
    bad_group = resolve_user("app:nogroup", PASSWD, GROUP)
    assert bad_group.problem and "nogroup" in bad_group.problem


def test_numeric_user_needs_no_passwd_file() -> None:
    user = resolve_user("65532:65532", None, None)
    assert (user.uid, user.gid, user.problem) == (65532, 65532, None)
