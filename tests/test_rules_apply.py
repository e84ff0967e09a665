"""Matching rules against facts and merging their contributions by precedence."""

from __future__ import annotations

from pathlib import Path

from sconify.analyze.analysis import region_for
from sconify.rules import RuleFacts, apply_rules, load_rules
from sconify.rules.apply import expand_path
from sconify.rules.loader import rule_from_data
from sconify.rules.model import RuleSet


def _facts(**kw: object) -> RuleFacts:
    files = set(kw.pop("files", ()))  # type: ignore[arg-type]
    base: dict[str, object] = {
        "executables": (), "interpreter": "none", "argv": (), "labels": {}, "env_names": (), "elf": {},
        "variables": {},
        "exists": lambda p: p in files or any(f.startswith(p.rstrip("/") + "/") for f in files),
        "listdir": lambda d: sorted({f[len(d.rstrip("/")) + 1:].split("/")[0] for f in files
                                     if f.startswith(d.rstrip("/") + "/")}),
    }
    base.update(kw)
    return RuleFacts(**base)  # type: ignore[arg-type]


def _rule(data: dict[str, object], rank: int = 0):  # type: ignore[no-untyped-def]
    return rule_from_data({"name": "r", **data}, "test", rank)


def test_expand_path_products_and_skips_empty_variables() -> None:
    assert expand_path("/etc/x", {}) == ["/etc/x"]
    assert expand_path("${app}/conf", {"app": ("/a", "/b")}) == ["/a/conf", "/b/conf"]
    assert expand_path("${app}", {"app": ()}) == []
    assert expand_path("${home}/.config", {"home": ("/",)}) == ["/.config"]


def test_conditions() -> None:
    facts = _facts(executables=("nginx", "/usr/sbin/nginx"), interpreter="none", argv=("nginx", "-g", "daemon off;"),
                   labels={"maintainer": "NGINX Docker Maintainers"}, env_names=("NGINX_VERSION", "PATH"),
                   elf={"static": False, "pie": True, "libc": "glibc"}, files={"/etc/nginx/nginx.conf"})
    from sconify.rules.apply import matches

    assert matches(_rule({"match": {"executable": "nginx"}}), facts)
    assert matches(_rule({"match": {"executable": "/usr/*/nginx"}}), facts)
    assert not matches(_rule({"match": {"executable": "redis-server"}}), facts)
    assert matches(_rule({"match": {"labels": {"maintainer": "NGINX*"}}}), facts)
    assert not matches(_rule({"match": {"labels": {"absent": "*"}}}), facts)
    assert matches(_rule({"match": {"paths": "/etc/nginx/*.conf"}}), facts)
    assert not matches(_rule({"match": {"paths": "/etc/nginx/*.json"}}), facts)
    assert matches(_rule({"match": {"env": "NGINX_*"}}), facts)
    assert matches(_rule({"match": {"elf": {"pie": True, "libc": "glibc"}}}), facts)
    assert not matches(_rule({"match": {"elf": {"static": True}}}), facts)
    assert matches(_rule({"match": {"interpreter": "none"}}), facts)
    # all direct conditions must hold; one of "any" must hold
    assert not matches(_rule({"match": {"executable": "nginx", "interpreter": "python"}}), facts)
    assert matches(_rule({"match": {"any": [{"interpreter": "python"}, {"argv": "daemon off;"}]}}), facts)
    assert not matches(_rule({"match": {"any": [{"interpreter": "python"}, {"argv": "x"}]}}), facts)
    assert matches(_rule({}), facts)


def test_later_rule_wins_for_the_same_path_and_setting(tmp_path: Path) -> None:
    low = rule_from_data({"name": "low", "priority": 0, "regions": [
        {"path": "/app", "mode": "encrypted", "reason": "low says"},
        {"path": "/data", "mode": "authenticated", "reason": "low data"}],
        "enclave": {"heap": "64M", "threads": 2}, "env": {"A": "1"}, "notes": ["n1"]}, "low", 0)
    high = rule_from_data({"name": "high", "priority": 10, "regions": [
        {"path": "/app", "mode": "authenticated", "reason": "high says"}],
        "enclave": {"heap": "1G"}, "env": {"A": "2"}, "notes": ["n1", "n2"]}, "high", 0)
    applied = apply_rules(RuleSet((low, high)), _facts())
    by_path = {r.path: r for r in applied.regions}
    assert (by_path["/app"].mode, by_path["/app"].rule) == ("authenticated", "high")
    assert by_path["/data"].rule == "low"
    assert applied.enclave["heap"] == (1 << 30, "high")
    assert applied.enclave["threads"] == (2, "low")
    assert applied.env["A"] == ("2", "high")
    assert [n for _, n in applied.notes] == ["n1", "n2"]
    assert applied.matched == ("low", "high")


def test_only_if_exists_and_region_order() -> None:
    rule = _rule({"regions": [
        {"path": "/z", "mode": "encrypted", "reason": "x", "only_if_exists": True},
        {"path": "/etc/app", "mode": "encrypted", "reason": "x", "only_if_exists": True},
        {"path": "/", "mode": "authenticated", "reason": "x"},
        {"path": "/etc", "mode": "authenticated", "reason": "x"}]})
    applied = apply_rules(RuleSet((rule,)), _facts(files={"/etc/app/a.conf"}))
    assert [r.path for r in applied.regions] == ["/", "/etc", "/etc/app"]


def test_longest_prefix_decides_a_file() -> None:
    rule = _rule({"regions": [
        {"path": "/", "mode": "authenticated", "reason": "root"},
        {"path": "/app", "mode": "encrypted", "reason": "app"},
        {"path": "/app/bin/server", "mode": "authenticated", "reason": "program"},
        {"path": "/app/tmp", "mode": "not-protected", "reason": "scratch"}]})
    regions = apply_rules(RuleSet((rule,)), _facts()).regions
    assert region_for(regions, "/app/conf/x").reason == "app"  # type: ignore[union-attr]
    assert region_for(regions, "/app/bin/server").reason == "program"  # type: ignore[union-attr]
    assert region_for(regions, "/app/tmpfile").reason == "app"  # type: ignore[union-attr]
    assert region_for(regions, "/app/tmp/f").reason == "scratch"  # type: ignore[union-attr]
    assert region_for(regions, "/usr/lib/x").reason == "root"  # type: ignore[union-attr]


def test_shipped_python_rule_matches_only_python() -> None:
    ruleset = load_rules()
    variables = {"code.stdlib": ("/usr/lib/python3.11",), "code.application": ("/app",), "app": ("/app",)}
    python = apply_rules(ruleset, _facts(interpreter="python", variables=variables))
    assert "python" in python.matched and "node" not in python.matched
    assert python.enclave["dlopen"] == ("authenticated", "python")
    modes = {r.path: r.mode for r in python.regions}
    assert modes["/usr/lib/python3.11"] == "authenticated" and modes["/app"] == "encrypted"
    native = apply_rules(ruleset, _facts(interpreter="none", elf={"static": True, "pie": True, "libc": "glibc"}))
    assert native.matched == ("default",)
    assert native.enclave["heap"] == (64 << 20, "default")


def test_shipped_go_rule_matches_a_libc_free_static_program() -> None:
    applied = apply_rules(load_rules(), _facts(elf={"static": True, "pie": False, "libc": "none"}))
    assert applied.matched == ("default", "go")
    assert applied.enclave["threads"] == (32, "go")
