"""Interpreters and their code trees: which runtime a program is (Python, Node.js, Java, Ruby, Perl, PHP,
POSIX shell), its version, the script it runs and the directories of code it loads."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sconify.analyze.command import join_in_image
from sconify.analyze.view import ImageView

SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "hush", "rbash"})
_PYTHON_RE = re.compile(r"^python(\d+(\.\d+)?)?[dmu]*$")
_RUBY_RE = re.compile(r"^ruby(\d+(\.\d+)*)?$")
_PERL_RE = re.compile(r"^perl(\d+(\.\d+)*)?$")
_PHP_RE = re.compile(r"^php(-fpm|-cgi|-cli)?(\d+(\.\d+)?)?(-fpm|-cgi)?$")
_VERSION_DIR_RE = re.compile(r"^(\d+)\.(\d+)(\.\d+)?$")

# Directories that are never "the application" even when a script or the working directory is there.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/sbin", "/usr", "/usr/bin", "/usr/sbin", "/usr/local", "/usr/local/bin", "/usr/local/sbin",
    "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share", "/usr/libexec", "/etc", "/var",
    "/var/lib", "/opt", "/srv", "/home", "/usr/src", "/usr/local/share", "/tmp", "/var/tmp", "/run", "/dev",
    "/proc", "/sys", "/mnt", "/media", "/boot",
})
# Top-level directories of the file system hierarchy; anything else at the top (/app, /code) is an application.
FHS_TOP = frozenset({
    "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt", "opt", "proc",
    "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var",
})


def interpreter_kind(invoked: str, real: str) -> str | None:
    """``python``, ``node``, ``java``, ``ruby``, ``perl``, ``php``, ``shell``, ``env`` or None for a program
    invoked as ``invoked`` (busybox applets go by that name) that resolves to ``real``."""
    for name in (posixpath.basename(invoked), posixpath.basename(real)):
        if name == "env":
            return "env"
        if name in SHELLS:
            return "shell"
        if _PYTHON_RE.match(name) or name in ("pypy", "pypy3"):
            return "python"
        if name in ("node", "nodejs"):
            return "node"
        if name == "java":
            return "java"
        if _RUBY_RE.match(name):
            return "ruby"
        if _PERL_RE.match(name):
            return "perl"
        if _PHP_RE.match(name):
            return "php"
    return None


def app_root(path: str, is_dir: bool) -> str | None:
    """The application directory a path belongs to (``/app/lib/x.py`` -> ``/app``, ``/opt/vendor/...`` ->
    ``/opt/vendor``); a file in a system directory is its own root; None for system directories."""
    path = posixpath.normpath(path)
    if path in SYSTEM_DIRS:
        return None
    parts = path.strip("/").split("/")
    first = parts[0]
    if first in ("opt", "srv", "home") and len(parts) >= 2:
        return "/" + "/".join(parts[:2])
    if parts[:2] == ["usr", "src"] and len(parts) >= 3:
        return "/" + "/".join(parts[:3])
    if parts[:3] == ["usr", "local", "src"] and len(parts) >= 4:
        return "/" + "/".join(parts[:4])
    if parts[:2] == ["var", "www"]:
        return "/" + "/".join(parts[:3])
    if first not in FHS_TOP:
        return "/" + first
    if is_dir:
        return path
    parent = posixpath.dirname(path)
    return path if parent in SYSTEM_DIRS else parent


@dataclass(frozen=True)
class CodeTree:
    """A directory or file of code or configuration an interpreter loads, with its role."""

    path: str
    role: str  # stdlib, site-packages, venv, application, pythonpath, node_modules, global_modules,
    # java_home, jar, classpath, gems, site, config

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "role": self.role}


@dataclass(frozen=True)
class Interpreter:
    """The runtime behind the final program, when it is an interpreter."""

    kind: str
    binary: str
    version: str | None
    script: str | None  # the file it runs, absolute in the image
    module: str | None  # python -m, java main class
    inline: bool  # code given on the command line (-c, -e)
    code_trees: tuple[CodeTree, ...]

    def trees(self, role: str) -> tuple[str, ...]:
        return tuple(t.path for t in self.code_trees if t.role == role)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "binary": self.binary,
            "version": self.version,
            "script": self.script,
            "module": self.module,
            "inline": self.inline,
            "code_trees": [t.to_json() for t in self.code_trees],
        }


@dataclass(frozen=True)
class _Args:
    script: str | None = None
    module: str | None = None
    inline: bool = False
    extra: tuple[tuple[str, str], ...] = ()  # (role, path) from options such as -cp, -I


def _split_options(
    args: Sequence[str], with_value: frozenset[str], stop_value: Mapping[str, str], attached: Sequence[str] = ()
) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """Walk interpreter options: returns ((option, value) pairs, first operand, stopping option kind)."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return pairs, (args[i + 1] if i + 1 < len(args) else None), None
        if not arg.startswith("-") or arg == "-":
            return pairs, arg, None
        name, eq, value = arg.partition("=")
        if name in stop_value:
            return pairs, None, stop_value[name] + ":" + (value if eq else (args[i + 1] if i + 1 < len(args) else ""))
        if name in with_value and not eq:
            pairs.append((name, args[i + 1] if i + 1 < len(args) else ""))
            i += 2
            continue
        for prefix in attached:
            if arg.startswith(prefix) and len(arg) > len(prefix):
                pairs.append((prefix, arg[len(prefix):]))
                break
        else:
            pairs.append((name, value))
        i += 1
    return pairs, None, None


def _python_args(args: Sequence[str]) -> _Args:
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return _Args(script=args[i + 1] if i + 1 < len(args) else None)
        if not arg.startswith("-") or arg == "-":
            return _Args(script=None if arg == "-" else arg)
        if arg.startswith("--"):
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        # Short options may be combined (-uB); -c, -m take the rest or the next item; -W, -X take a value.
        for j, letter in enumerate(arg[1:], start=1):
            rest = arg[j + 1:]
            if letter in "cm":
                value = rest or (args[i + 1] if i + 1 < len(args) else "")
                return _Args(inline=True) if letter == "c" else _Args(module=value)
            if letter in "WX":
                if not rest:
                    i += 1
                break
        i += 1
    return _Args()


def _node_args(args: Sequence[str]) -> _Args:
    with_value = frozenset({"-r", "--require", "--loader", "--experimental-loader", "--import", "-C", "--conditions",
                            "--env-file", "--title", "--input-type", "--inspect-port", "--stack-size"})
    stop = {"-e": "inline", "--eval": "inline", "-p": "inline", "--print": "inline"}
    pairs, operand, stopped = _split_options(args, with_value, stop)
    return _Args(script=operand, inline=stopped is not None)


def _java_args(args: Sequence[str], env: Mapping[str, str]) -> _Args:
    extra: list[tuple[str, str]] = []
    i = 0
    classpath: str | None = env.get("CLASSPATH")
    while i < len(args):
        arg = args[i]
        if arg == "-jar":
            jar = args[i + 1] if i + 1 < len(args) else None
            if jar:
                extra.append(("jar", jar))
            # With -jar the JVM ignores -cp and CLASSPATH; the jar's manifest names its class path.
            return _Args(script=jar, extra=tuple(extra))
        if arg in ("-cp", "-classpath", "--class-path"):
            classpath = args[i + 1] if i + 1 < len(args) else ""
            i += 2
            continue
        if arg in ("-p", "--module-path"):
            for item in (args[i + 1] if i + 1 < len(args) else "").split(":"):
                if item:
                    extra.append(("classpath", item))
            i += 2
            continue
        if arg.startswith("-javaagent:"):
            extra.append(("jar", arg.split(":", 1)[1].split("=", 1)[0]))
        elif arg in ("-m", "--module"):
            return _Args(module=args[i + 1] if i + 1 < len(args) else None,
                         extra=tuple(extra) + _classpath(classpath))
        elif arg.startswith("--") and "=" not in arg and arg in ("--add-opens", "--add-exports", "--add-modules",
                                                                   "--add-reads", "--patch-module"):
            i += 2
            continue
        elif not arg.startswith("-"):
            if arg.endswith(".java"):  # single-file source launcher
                return _Args(script=arg, extra=tuple(extra) + _classpath(classpath))
            return _Args(module=arg, extra=tuple(extra) + _classpath(classpath))
        i += 1
    return _Args(extra=tuple(extra) + _classpath(classpath))


def _classpath(value: str | None) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    out = []
    for item in value.split(":"):
        item = item[:-2] if item.endswith("/*") else item
        if item and item != ".":
            out.append(("classpath", item))
    return tuple(out)


def _ruby_perl_args(args: Sequence[str], kind: str) -> _Args:
    extra: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return _Args(script=args[i + 1] if i + 1 < len(args) else None, extra=tuple(extra))
        if not arg.startswith("-") or arg == "-":
            return _Args(script=None if arg == "-" else arg, extra=tuple(extra))
        if arg in ("-e", "-E"):
            return _Args(inline=True, extra=tuple(extra))
        if arg.startswith("-I"):
            value = arg[2:] or (args[i + 1] if i + 1 < len(args) else "")
            if not arg[2:]:
                i += 1
            extra.append(("application", value))
        elif kind == "ruby" and arg in ("-C", "-r"):
            i += 1
        i += 1
    return _Args(extra=tuple(extra))


def _php_args(args: Sequence[str]) -> _Args:
    with_value = frozenset({"-c", "-d", "-z", "-t", "-y", "--fpm-config", "-g", "--pid", "-p", "--prefix"})
    extra: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-f":
            return _Args(script=args[i + 1] if i + 1 < len(args) else None, extra=tuple(extra))
        if arg in ("-r", "-R", "-B", "-E"):
            return _Args(inline=True, extra=tuple(extra))
        if arg in with_value:
            if arg in ("-c", "-y", "--fpm-config") and i + 1 < len(args):
                extra.append(("config", args[i + 1]))
            i += 2
            continue
        if not arg.startswith("-"):
            return _Args(script=arg, extra=tuple(extra))
        i += 1
    return _Args(extra=tuple(extra))


def _shell_args(args: Sequence[str]) -> _Args:
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 2
            continue
        if arg[:1] in ("-", "+") and len(arg) > 1:
            if not arg.startswith("--") and "c" in arg[1:]:
                return _Args(inline=True)
            i += 1
            continue
        break
    return _Args(script=args[i] if i < len(args) else None)


def _highest_version_dir(view: ImageView, parent: str, prefix: str) -> str | None:
    """The name of the highest ``prefix<MAJOR.MINOR>`` directory in ``parent``."""
    best: tuple[tuple[int, ...], str] | None = None
    for name in view.listdir(parent):
        if not name.startswith(prefix):
            continue
        m = _VERSION_DIR_RE.match(name[len(prefix):])
        if m and view.is_dir(posixpath.join(parent, name)):
            key = tuple(int(x) for x in name[len(prefix):].split("."))
            if best is None or key > best[0]:
                best = (key, name)
    return best[1] if best else None


def _prefix(binary: str) -> str:
    """``/usr`` for ``/usr/bin/python3``: the installation prefix of a binary in a ``bin`` directory."""
    parent = posixpath.dirname(binary)
    return posixpath.dirname(parent) if posixpath.basename(parent) in ("bin", "sbin") else parent


class _Trees:
    """Collects code trees, keeping only those that exist and each path once."""

    def __init__(self, view: ImageView) -> None:
        self._view = view
        self.items: list[CodeTree] = []

    def add(self, path: str | None, role: str, must_exist: bool = True) -> None:
        if not path:
            return
        path = posixpath.normpath(path)
        if must_exist and not self._view.exists(path):
            return
        if any(t.path == path for t in self.items):
            return
        self.items.append(CodeTree(path, role))


def _application(trees: _Trees, view: ImageView, script: str | None, workdir: str, volumes: Sequence[str]) -> None:
    if script:
        root = app_root(script, view.is_dir(script))
        if root:
            trees.add(root, "application")
    if workdir not in SYSTEM_DIRS and not any(_under(workdir, v) for v in volumes):
        root = app_root(workdir, True)
        if root:
            trees.add(root, "application")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def describe_interpreter(
    kind: str,
    invoked: str,
    binary: str,
    args: Sequence[str],
    env: Mapping[str, str],
    workdir: str,
    home: str,
    view: ImageView,
    volumes: Sequence[str] = (),
) -> Interpreter:
    """The interpreter ``binary`` (found as ``invoked``) running ``args``: version, script and code trees."""
    trees = _Trees(view)
    version: str | None = None
    parsed = _Args()
    prefix = _prefix(binary)
    if kind == "python":
        parsed = _python_args(args)
        name = posixpath.basename(binary)
        m = re.match(r"^python(\d+\.\d+)", name)
        venv_root = _prefix(invoked)
        venv_cfg = view.text(posixpath.join(venv_root, "pyvenv.cfg")) if view.is_file(
            posixpath.join(venv_root, "pyvenv.cfg")) else None
        if m:
            version = m.group(1)
        else:
            found = _highest_version_dir(view, posixpath.join(prefix, "lib"), "python")
            version = found[len("python"):] if found else None
        if venv_cfg is not None:
            cfg_version = re.search(r"^\s*version(?:_info)?\s*=\s*(\d+\.\d+)", venv_cfg, re.M)
            version = version or (cfg_version.group(1) if cfg_version else None)
            trees.add(venv_root, "venv")
        if version:
            trees.add(f"{prefix}/lib/python{version}", "stdlib")
            for base in (prefix, "/usr/local", "/usr"):
                trees.add(f"{base}/lib/python{version}/site-packages", "site-packages")
                trees.add(f"{base}/lib/python{version}/dist-packages", "site-packages")
            trees.add("/usr/lib/python3/dist-packages", "site-packages")
            if venv_cfg is not None:
                trees.add(f"{venv_root}/lib/python{version}/site-packages", "site-packages")
            if home and home != "/":
                trees.add(f"{home}/.local/lib/python{version}/site-packages", "site-packages")
        for item in (env.get("PYTHONPATH") or "").split(":"):
            if item:
                trees.add(join_in_image(workdir, item), "pythonpath")
    elif kind == "node":
        parsed = _node_args(args)
        header = f"{prefix}/include/node/node_version.h"
        text = view.text(header) if view.is_file(header) else None
        if text:
            parts = [re.search(rf"#define NODE_{p}_VERSION (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
            if all(parts):
                version = ".".join(p.group(1) for p in parts if p)
        trees.add(f"{prefix}/lib/node_modules", "global_modules")
        for item in (env.get("NODE_PATH") or "").split(":"):
            if item:
                trees.add(join_in_image(workdir, item), "node_modules")
    elif kind == "java":
        parsed = _java_args(args, env)
        java_home = env.get("JAVA_HOME")
        if not java_home or not view.is_dir(java_home):
            java_home = prefix
        trees.add(java_home, "java_home")
        release = view.text(f"{java_home}/release") if view.is_file(f"{java_home}/release") else None
        if release:
            m = re.search(r'^JAVA_VERSION="?([^"\n]+)"?', release, re.M)
            version = m.group(1) if m else None
    elif kind in ("ruby", "perl"):
        parsed = _ruby_perl_args(args, kind)
        if kind == "ruby":
            for base in (prefix, "/usr", "/usr/local"):
                found = _highest_version_dir(view, f"{base}/lib/ruby", "")
                if found:
                    version = version or found
                    trees.add(f"{base}/lib/ruby/{found}", "stdlib")
                    trees.add(f"{base}/lib/ruby/gems/{found}", "gems")
                    trees.add(f"{base}/lib/ruby/vendor_ruby", "gems")
                    trees.add(f"/var/lib/gems/{found}", "gems")
            for name in ("GEM_HOME", "BUNDLE_PATH", "BUNDLE_APP_CONFIG"):
                if env.get(name):
                    trees.add(join_in_image(workdir, env[name]), "gems")
        else:
            m = re.match(r"^perl(\d+\.\d+(\.\d+)?)", posixpath.basename(binary))
            version = m.group(1) if m else None
            for parent in ("/usr/lib/x86_64-linux-gnu/perl", "/usr/share/perl", "/usr/local/lib/perl5"):
                found = _highest_version_dir(view, parent, "")
                if found:
                    version = version or found
                    trees.add(f"{parent}/{found}", "stdlib")
            for site in ("/usr/share/perl5", "/usr/lib/x86_64-linux-gnu/perl5", "/usr/local/lib/perl5/site_perl",
                         "/usr/local/share/perl", "/usr/local/lib/x86_64-linux-gnu/perl"):
                trees.add(site, "site")
            for item in (env.get("PERL5LIB") or env.get("PERLLIB") or "").split(":"):
                if item:
                    trees.add(join_in_image(workdir, item), "application")
    elif kind == "php":
        parsed = _php_args(args)
        m = re.search(r"(\d+\.\d+)$", posixpath.basename(binary))
        version = m.group(1) if m else None
        if version is None:
            found = _highest_version_dir(view, "/etc/php", "")
            version = found
        for lib in (f"{prefix}/lib/php", "/usr/share/php", "/usr/lib/php"):
            trees.add(lib, "stdlib")
        for conf in (f"{prefix}/etc/php", f"{prefix}/etc/php-fpm.conf", f"{prefix}/etc/php-fpm.d", "/etc/php"):
            trees.add(conf, "config")
        if parsed.script is None and not parsed.inline:
            trees.add("/var/www/html", "application")
    elif kind == "shell":
        parsed = _shell_args(args)
    script = join_in_image(workdir, parsed.script) if parsed.script else None
    _application(trees, view, script, workdir, volumes)
    for role, path in parsed.extra:
        trees.add(join_in_image(workdir, path), role)
    if kind == "node":
        for root in [t.path for t in trees.items if t.role == "application"]:
            base = root if view.is_dir(root) else posixpath.dirname(root)
            trees.add(f"{base}/node_modules", "node_modules")
    return Interpreter(kind, binary, version, script, parsed.module, parsed.inline, tuple(trees.items))
