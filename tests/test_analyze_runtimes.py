"""Interpreters, shipped application rules and library search on small images made here for each case.

The "interpreters" are Debian's static busybox under another name: the analyzer reads names, ELF headers and
the files around them, it never runs anything, so that is enough to stand for node, java, ruby, perl or php.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures import parts  # noqa: E402
from fixtures.builder import write_spec  # noqa: E402
from fixtures.spec import DEFAULT_PATH, ImageSpec, LayerBuilder  # noqa: E402
from sconify.analyze import Analysis, analyze  # noqa: E402

BUSYBOX = Path("/usr/bin/busybox")
WRAPPER = '#!/bin/sh\nset -e\nif [ "${1#-}" != "$1" ]; then\n  set -- default "$@"\nfi\n\nexec "$@"\n'


def _base() -> LayerBuilder:
    layer = LayerBuilder("base")
    layer.host_file("/bin/busybox", BUSYBOX)
    for applet in ("sh", "env"):
        layer.symlink(f"/bin/{applet}", "busybox")
    parts.etc_files(layer)
    return layer


def _image(tmp_path: Path, name: str, layers: list[LayerBuilder], config: dict[str, Any],
           labels: dict[str, str] | None = None) -> Analysis:
    config = {"Env": [f"PATH={DEFAULT_PATH}"], **config}
    spec = ImageSpec(name, tuple(layer.build() for layer in layers), config, labels=labels or {})
    built = write_spec(spec, tmp_path / name, "t")
    return analyze(built.open(), source=built.reference)


def _modes(a: Analysis) -> dict[str, str]:
    return {r.path: r.mode for r in a.regions}


def test_node_application_with_node_modules(tmp_path: Path) -> None:
    app = LayerBuilder("node")
    app.host_file("/usr/local/bin/node", BUSYBOX)
    app.file("/usr/local/include/node/node_version.h",
             "#define NODE_MAJOR_VERSION 20\n#define NODE_MINOR_VERSION 11\n#define NODE_PATCH_VERSION 1\n")
    app.file("/usr/local/lib/node_modules/npm/package.json", "{}")
    app.file("/usr/src/app/server.js", "require('express')\n")
    app.file("/usr/src/app/node_modules/express/index.js", "module.exports = 1\n")
    a = _image(tmp_path, "node", [_base(), app], {"Cmd": ["node", "--enable-source-maps", "server.js"],
                                                  "WorkingDir": "/usr/src/app"})
    assert a.convertible
    i = a.interpreter
    assert i is not None and (i.kind, i.version, i.script) == ("node", "20.11.1", "/usr/src/app/server.js")
    assert i.trees("node_modules") == ("/usr/src/app/node_modules",)
    assert i.trees("global_modules") == ("/usr/local/lib/node_modules",)
    assert a.mode_of("/usr/src/app/server.js").mode == "encrypted"  # type: ignore[union-attr]
    assert a.mode_of("/usr/src/app/node_modules/express/index.js").mode == "authenticated"  # type: ignore[union-attr]
    assert "node" in a.rules_matched and a.enclave.heap == 2 << 30


def test_java_jar_with_java_home(tmp_path: Path) -> None:
    jdk = LayerBuilder("jdk")
    jdk.host_file("/opt/java/openjdk/bin/java", BUSYBOX)
    jdk.file("/opt/java/openjdk/release", 'IMPLEMENTOR="Eclipse Adoptium"\nJAVA_VERSION="17.0.9"\n')
    jdk.file("/opt/java/openjdk/lib/modules", b"\0" * 64)
    jdk.file("/app/app.jar", b"PK\x03\x04")
    config = {"Env": [f"PATH=/opt/java/openjdk/bin:{DEFAULT_PATH}", "JAVA_HOME=/opt/java/openjdk"],
              "Entrypoint": ["java", "-Xmx512m", "-Dx=y", "-jar", "/app/app.jar"], "Cmd": ["--server.port=8080"]}
    a = _image(tmp_path, "java", [_base(), jdk], config)
    i = a.interpreter
    assert i is not None and (i.kind, i.version, i.script) == ("java", "17.0.9", "/app/app.jar")
    assert i.trees("java_home") == ("/opt/java/openjdk",) and i.trees("jar") == ("/app/app.jar",)
    modes = _modes(a)
    assert modes["/opt/java/openjdk"] == "authenticated" and modes["/app/app.jar"] == "encrypted"
    assert (a.enclave.heap, a.enclave.threads) == (4 << 30, 64)


def test_java_class_path_and_main_class(tmp_path: Path) -> None:
    jdk = LayerBuilder("jdk")
    jdk.host_file("/usr/lib/jvm/java-17/bin/java", BUSYBOX)
    jdk.symlink("/usr/bin/java", "/usr/lib/jvm/java-17/bin/java")
    jdk.file("/srv/lib/dep.jar", b"PK").file("/srv/classes/Main.class", b"\xca\xfe\xba\xbe")
    a = _image(tmp_path, "java-cp", [_base(), jdk],
               {"Cmd": ["java", "-cp", "/srv/lib/*:/srv/classes", "com.example.Main"], "WorkingDir": "/srv"})
    i = a.interpreter
    assert i is not None and i.module == "com.example.Main" and i.script is None
    assert i.trees("java_home") == ("/usr/lib/jvm/java-17",)  # found from the java binary behind the symlink
    assert set(i.trees("classpath")) == {"/srv/lib", "/srv/classes"}


def test_ruby_with_gems(tmp_path: Path) -> None:
    ruby = LayerBuilder("ruby")
    ruby.host_file("/usr/local/bin/ruby", BUSYBOX)
    ruby.file("/usr/local/lib/ruby/3.2.0/set.rb", "class Set; end\n")
    ruby.file("/usr/local/bundle/gems/rack/lib/rack.rb", "module Rack; end\n")
    ruby.file("/srv/app/app.rb", "puts 1\n")
    config = {"Env": [f"PATH={DEFAULT_PATH}", "GEM_HOME=/usr/local/bundle"], "Cmd": ["ruby", "app.rb"],
              "WorkingDir": "/srv/app"}
    a = _image(tmp_path, "ruby", [_base(), ruby], config)
    i = a.interpreter
    assert i is not None and (i.kind, i.version, i.script) == ("ruby", "3.2.0", "/srv/app/app.rb")
    assert i.trees("stdlib") == ("/usr/local/lib/ruby/3.2.0",)
    assert "/usr/local/bundle" in i.trees("gems")
    assert _modes(a)["/srv/app"] == "encrypted" and _modes(a)["/usr/local/bundle"] == "authenticated"


def test_perl_script(tmp_path: Path) -> None:
    perl = LayerBuilder("perl")
    perl.host_file("/usr/bin/perl", BUSYBOX)
    perl.file("/usr/share/perl/5.36/strict.pm", "1;\n")
    perl.file("/opt/tool/run.pl", "#!/usr/bin/perl\nprint 1;\n", mode=0o755)
    a = _image(tmp_path, "perl", [_base(), perl], {"Cmd": ["perl", "-w", "/opt/tool/run.pl"]})
    i = a.interpreter
    assert i is not None and (i.kind, i.version, i.script) == ("perl", "5.36", "/opt/tool/run.pl")
    assert _modes(a)["/opt/tool"] == "encrypted" and _modes(a)["/usr/share/perl/5.36"] == "authenticated"


def test_php_fpm_behind_an_entrypoint_wrapper(tmp_path: Path) -> None:
    php = LayerBuilder("php")
    php.host_file("/usr/local/sbin/php-fpm", BUSYBOX)
    php.file("/usr/local/bin/docker-php-entrypoint", WRAPPER, mode=0o755)
    php.file("/usr/local/etc/php-fpm.conf", "[global]\n")
    php.file("/usr/local/lib/php/PEAR.php", "<?php\n")
    php.file("/var/www/html/index.php", "<?php echo 1;\n")
    a = _image(tmp_path, "php", [_base(), php],
               {"Entrypoint": ["docker-php-entrypoint"], "Cmd": ["php-fpm"], "WorkingDir": "/var/www/html"})
    assert a.executable == "/usr/local/sbin/php-fpm"
    assert [s.kind for s in a.chain if s.kind == "wrapper"] == ["wrapper"]
    i = a.interpreter
    assert i is not None and i.kind == "php"
    modes = _modes(a)
    assert modes["/usr/local/etc/php-fpm.conf"] == "encrypted"
    assert modes["/var/www/html"] == "encrypted"
    assert modes["/usr/local/lib/php"] == "authenticated"
    assert modes["/usr/local/bin/docker-php-entrypoint"] == "encrypted"


def test_wrapper_with_an_option_argument_is_not_followed(tmp_path: Path) -> None:
    layer = LayerBuilder("w")
    layer.file("/usr/local/bin/entry", WRAPPER, mode=0o755)
    a = _image(tmp_path, "wrap-opt", [_base(), layer], {"Entrypoint": ["entry"], "Cmd": ["--verbose"]})
    assert a.executable == "/bin/busybox"
    assert "wrapper-option-argument" in [n.code for n in a.notes]


def test_python_venv_and_module(tmp_path: Path) -> None:
    py = LayerBuilder("python")
    py.host_file("/usr/local/bin/python3.12", BUSYBOX)
    py.file("/usr/local/lib/python3.12/os.py", "# os\n")
    py.symlink("/opt/venv/bin/python", "/usr/local/bin/python3.12")
    py.file("/opt/venv/pyvenv.cfg", "home = /usr/local/bin\nversion = 3.12.1\n")
    py.file("/opt/venv/lib/python3.12/site-packages/flask/__init__.py", "\n")
    py.file("/app/myapp/__main__.py", "print(1)\n")
    config = {"Env": [f"PATH=/opt/venv/bin:{DEFAULT_PATH}", "PYTHONPATH=/app/vendor"],
              "Cmd": ["python", "-u", "-m", "myapp"], "WorkingDir": "/app"}
    py.file("/app/vendor/x.py", "\n")
    a = _image(tmp_path, "venv", [_base(), py], config)
    i = a.interpreter
    assert i is not None and (i.kind, i.version, i.module, i.script) == ("python", "3.12", "myapp", None)
    assert i.trees("venv") == ("/opt/venv",)
    assert i.trees("site-packages") == ("/opt/venv/lib/python3.12/site-packages",)
    assert i.trees("stdlib") == ("/usr/local/lib/python3.12",)
    assert i.trees("pythonpath") == ("/app/vendor",)
    modes = _modes(a)
    assert modes["/app"] == "encrypted" and modes["/opt/venv/lib/python3.12/site-packages"] == "authenticated"


@pytest.mark.parametrize(("program", "argv", "rule"), [
    ("/usr/sbin/nginx", ["nginx", "-g", "daemon off;"], "nginx"),
    ("/usr/local/bin/redis-server", ["redis-server", "/usr/local/etc/redis/redis.conf"], "redis"),
    ("/usr/lib/postgresql/15/bin/postgres", ["postgres"], "postgres"),
])
def test_application_rules(tmp_path: Path, program: str, argv: list[str], rule: str) -> None:
    layer = LayerBuilder(rule)
    layer.host_file(program, BUSYBOX)
    layer.file("/docker-entrypoint.sh", WRAPPER, mode=0o755)
    layer.file("/etc/nginx/nginx.conf", "events {}\n").dir("/var/cache/nginx")
    layer.file("/usr/local/etc/redis/redis.conf", "requirepass x\n")
    layer.file("/docker-entrypoint-initdb.d/init.sql", "create table t();\n")
    path = f"/usr/lib/postgresql/15/bin:{DEFAULT_PATH}"
    config = {"Env": [f"PATH={path}"], "Entrypoint": ["/docker-entrypoint.sh"], "Cmd": argv,
              "Volumes": {"/data": {}}, "WorkingDir": "/data"}
    a = _image(tmp_path, rule, [_base(), layer], config)
    assert a.executable == program and rule in a.rules_matched
    others = {"nginx", "redis", "postgres"} - {rule}
    assert not others & set(a.rules_matched)
    modes = _modes(a)
    assert modes["/data"] == "not-protected"  # a volume, not the application, although it is the WorkingDir
    expected = {"nginx": {"/etc/nginx": "encrypted", "/var/cache/nginx": "not-protected"},
                "redis": {"/usr/local/etc/redis": "encrypted"},
                "postgres": {"/docker-entrypoint-initdb.d": "encrypted"}}[rule]
    for path, mode in expected.items():
        assert modes[path] == mode


def test_rules_can_match_labels(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "vendor.yaml").write_text("name: vendor\nmatch:\n  labels:\n    org.opencontainers.image.vendor: Acme*\n"
                                       "notes:\n  - Acme images keep their licence in /licence.\n")
    from sconify.rules import load_rules

    layer = LayerBuilder("x").file("/app/run.sh", "#!/bin/sh\necho\n", mode=0o755)
    spec_labels = {"org.opencontainers.image.vendor": "Acme Corp"}
    config = {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["/app/run.sh"]}
    built = write_spec(ImageSpec("lab", (_base().build(), layer.build()), config, labels=spec_labels),
                       tmp_path / "lab", "t")
    a = analyze(built.open(), load_rules([rules]))
    assert "vendor" in a.rules_matched and a.labels == spec_labels
    assert ("vendor", "Acme images keep their licence in /licence.") in [(n.rule, n.message) for n in a.notes]


def test_bad_commands_are_problems(tmp_path: Path) -> None:
    layer = LayerBuilder("bad")
    layer.file("/app/not-exec", "#!/bin/sh\n", mode=0o644)
    layer.file("/app/data.bin", b"\x00\x01binary", mode=0o755)
    layer.dir("/app/dir")
    cases = {
        "absent": ({"Cmd": ["no-such-program"]}, "missing-executable"),
        "missing-path": ({"Cmd": ["/opt/none/bin/x"]}, "missing-executable"),
        "noexec": ({"Cmd": ["/app/not-exec"]}, "not-executable"),
        "format": ({"Cmd": ["/app/data.bin"]}, "not-executable"),
        "dir": ({"Cmd": ["/app/dir"]}, "not-executable"),
        "user": ({"Cmd": ["/bin/sh"], "User": "ghost"}, "unknown-user"),
    }
    for name, (config, code) in cases.items():
        a = _image(tmp_path, name, [_base(), layer], config)
        assert code in [p.code for p in a.problems], name
        assert a.error() is not None and a.error().exit_code == 11  # type: ignore[union-attr]


def test_relative_working_dir_and_path_lookup(tmp_path: Path) -> None:
    layer = LayerBuilder("w").file("/work/bin/tool", "#!/bin/sh\nexit 0\n", mode=0o755)
    a = _image(tmp_path, "reldir", [_base(), layer],
               {"Env": ["PATH=bin:/usr/bin"], "Cmd": ["tool"], "WorkingDir": "work"})
    assert a.workdir == "/work" and "relative-workdir" in [w.code for w in a.warnings]
    assert ("path-lookup", "/work/bin/tool") in [(s.kind, s.path) for s in a.chain]


@pytest.fixture(scope="module")
def rpath_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A program with RPATH $ORIGIN/../lib, its library, and a library that library needs."""
    d = tmp_path_factory.mktemp("rpath")
    (d / "extra.c").write_text("int extra(void) { return 2; }\n")
    (d / "helper.c").write_text("int extra(void);\nint helper(void) { return extra() + 1; }\n")
    (d / "prog.c").write_text("int helper(void);\nint main(void) { return helper(); }\n")

    def cc(*args: str) -> None:
        subprocess.run(["gcc", *args], check=True, capture_output=True, cwd=d)

    cc("-shared", "-fPIC", "-o", "libextra.so", "extra.c")
    cc("-shared", "-fPIC", "-o", "libhelper.so", "helper.c", "-L.", "-lextra")
    cc("-o", "prog", "prog.c", "-L.", "-lhelper", "-Wl,--disable-new-dtags,-rpath,$ORIGIN/../lib",
       "-Wl,--allow-shlib-undefined")
    return {"prog": d / "prog", "helper": d / "libhelper.so", "extra": d / "libextra.so"}


def test_origin_rpath_and_ld_so_conf_resolve_transitively(tmp_path: Path,
                                                          rpath_programs: dict[str, Path]) -> None:
    libs = parts.add_libraries(LayerBuilder("glibc"), [Path("/bin/true")])
    app = LayerBuilder("app")
    app.host_file("/opt/app/bin/prog", rpath_programs["prog"])
    app.host_file("/opt/app/lib/libhelper.so", rpath_programs["helper"])
    app.host_file("/opt/extra/libextra.so", rpath_programs["extra"])
    app.file("/etc/ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n")
    app.file("/etc/ld.so.conf.d/extra.conf", "/opt/extra\n")
    a = _image(tmp_path, "rpath", [_base(), libs, app], {"Cmd": ["/opt/app/bin/prog"]})
    assert a.convertible, a.problems
    assert a.elf is not None
    found = {lib.name: (lib.path, lib.via, lib.needed_by) for lib in a.elf.libraries}
    assert found["libhelper.so"] == ("/opt/app/lib/libhelper.so", "rpath", "/opt/app/bin/prog")
    # libhelper has no RPATH of its own: its loader's RPATH is tried first, then ld.so.conf finds libextra
    assert found["libextra.so"] == ("/opt/extra/libextra.so", "ld.so.conf", "/opt/app/lib/libhelper.so")
    assert found["libc.so.6"][1] == "default"
    assert a.mode_of("/opt/app/lib/libhelper.so").mode == "authenticated"  # type: ignore[union-attr]
    assert a.mode_of("/opt/app/etc/app.conf").mode == "encrypted"  # type: ignore[union-attr]
    # without the ld.so.conf entry the transitive library is missing
    bare = LayerBuilder("app")
    bare.host_file("/opt/app/bin/prog", rpath_programs["prog"])
    bare.host_file("/opt/app/lib/libhelper.so", rpath_programs["helper"])
    bare.host_file("/opt/extra/libextra.so", rpath_programs["extra"])
    b = _image(tmp_path, "rpath-missing", [_base(), parts.add_libraries(LayerBuilder("glibc"), [Path("/bin/true")]),
                                           bare], {"Cmd": ["/opt/app/bin/prog"]})
    assert [(p.code, "libextra.so" in p.message) for p in b.problems] == [("missing-library", True)]


def test_busybox_multi_call_and_python_inline_code(tmp_path: Path) -> None:
    layer = LayerBuilder("x")
    layer.file("/app/entry.sh", WRAPPER.replace("#!/bin/sh", "#!/bin/busybox sh"), mode=0o755)
    layer.host_file("/usr/bin/python3", BUSYBOX)
    a = _image(tmp_path, "multicall", [_base(), layer], {"Cmd": ["/bin/busybox", "sh", "/app/entry.sh", "python3",
                                                                 "-c", "print(1)"]})
    assert [s.path for s in a.chain if s.kind == "wrapper"] == ["/app/entry.sh"]
    i = a.interpreter
    assert i is not None and (i.kind, i.inline, i.module, i.script) == ("python", True, None, None)
    assert list(a.final_argv) == ["python3", "-c", "print(1)"]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_uncompressed_and_zstd_layers(tmp_path: Path, compression: str) -> None:
    from fixtures.builder import build_image

    built = build_image("busybox-sh", tmp_path / compression, "t", compression=compression)
    a = analyze(built.open())
    assert a.convertible and a.executable == "/bin/busybox"
    sizes = [layer.descriptor.size for layer in built.open().layers]
    assert a.reads.header_pass_compressed_bytes == sum(sizes)
    if compression == "none":
        assert a.reads.compressed_bytes == a.reads.uncompressed_bytes
    else:
        assert a.reads.compressed_bytes < a.reads.uncompressed_bytes


def test_loops_anywhere_are_problems_not_crashes(tmp_path: Path) -> None:
    layer = LayerBuilder("loops")
    layer.symlink("/x", "/y").symlink("/y", "/x")
    layer.symlink("/s1", "s2").symlink("/s2", "/s1")
    in_dir = _image(tmp_path, "dir-loop", [_base(), layer], {"Cmd": ["/x/prog"]})
    assert [p.code for p in in_dir.problems] == ["symlink-loop"]
    assert "/x/prog" in in_dir.problems[0].message
    script = _image(tmp_path, "script-loop", [_base(), layer], {"Cmd": ["/bin/sh", "/s1"]})
    assert [p.code for p in script.problems] == ["symlink-loop"]


def test_loader_behind_a_symlink_loop_is_missing(tmp_path: Path) -> None:
    source = tmp_path / "p.c"
    source.write_text("int main(void) { return 0; }\n")
    program = tmp_path / "p"
    subprocess.run(["gcc", "-o", str(program), str(source), "-Wl,--dynamic-linker=/loop/ld.so"], check=True,
                   capture_output=True)
    layer = LayerBuilder("p").host_file("/app/p", program).symlink("/loop", "/loop")
    a = _image(tmp_path, "loader-loop", [_base(), layer], {"Cmd": ["/app/p"]})
    assert "missing-loader" in [p.code for p in a.problems]
    assert a.elf is not None and a.elf.missing[0].name == "/loop/ld.so"
