"""The readable report of an Analysis for people (``sconify analyze`` without ``--json``), as plain text."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Sequence

from sconify.analyze.analysis import Analysis
from sconify.analyze.findings import Finding
from sconify.rules.model import format_size

_SECRET_RE = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)


def _mib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r))).rstrip() for r in rows]


def _findings(title: str, items: Iterable[Finding]) -> list[str]:
    items = list(items)
    if not items:
        return []
    out = ["", f"{title} ({len(items)})"]
    for item in items:
        tag = f"[{item.code}]" if not item.rule else f"[{item.rule}]"
        message = item.message if item.message.endswith(".") else item.message + "."
        out.append(f"  {tag} {message}")
    return out


def masked_env(items: Iterable[str]) -> list[str]:
    """``NAME=value`` lines with the values of secret-looking names replaced by ``***``."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        out.append(f"{name}={'***' if _SECRET_RE.search(name) and value else value}" if sep else item)
    return out


def render_text(a: Analysis, max_libraries: int = 12) -> str:
    """The report: verdict, problems, command, program and chain, ELF, interpreter, regions, settings, warnings."""
    lines: list[str] = []
    verdict = "yes" if a.convertible else f"no ({len(a.problems)} problem{'s' if len(a.problems) != 1 else ''})"
    lines += _table([
        ["image:", a.source],
        ["digest:", a.digest],
        ["platform:", a.platform],
        ["convertible:", verdict],
    ], indent="")
    lines += _findings("PROBLEMS", a.problems)

    lines += ["", "COMMAND"]
    cmd = a.command
    user = a.user
    who = f"{user.name or user.uid} (uid {user.uid}, gid {user.gid})" if user.uid is not None else repr(user.spec)
    lines += _table([
        ["entrypoint:", json.dumps(list(cmd.entrypoint)) if cmd.entrypoint is not None else "(none)"],
        ["cmd:", json.dumps(list(cmd.cmd)) if cmd.cmd is not None else "(none)"],
        ["argv:", shlex.join(a.argv) if a.argv else "(empty)"],
        ["shell form:", "yes" if cmd.shell_form else "no"],
        ["user:", f"{who}, home {user.home}" + (f", USER {user.spec!r}" if user.spec else ", USER not set")],
        ["workdir:", a.workdir],
    ])
    if a.env:
        lines.append("  env:")
        lines += [f"    {e}" for e in masked_env(a.env)]

    lines += ["", "EXECUTABLE", f"  {a.executable or '(none found)'}"]
    if a.chain:
        lines.append("  how it is reached:")
        lines += _table([[s.kind, s.path, s.detail] for s in a.chain], indent="    ")

    for prog in a.programs:
        title = "ELF" if prog.path == a.executable else "ELF (also executed)"
        lines += ["", f"{title}  {prog.path}"]
        linking = "static" if prog.static else "dynamic"
        kind = {"exec": "ET_EXEC", "dyn": "ET_DYN", "rel": "ET_REL", "core": "ET_CORE"}.get(prog.type, prog.type)
        facts = f"{prog.elf_class}-bit {prog.machine}, {kind}, {linking}, {'PIE' if prog.pie else 'not PIE'}, " \
                f"libc {prog.libc}"
        lines.append(f"  {facts}")
        if prog.error:
            lines.append(f"  unreadable: {prog.error}")
        if prog.interpreter:
            lines.append(f"  interpreter: {prog.interpreter}")
        if prog.rpath or prog.runpath:
            lines.append(f"  rpath: {':'.join(prog.rpath) or '-'}  runpath: {':'.join(prog.runpath) or '-'}")
        if prog.libraries:
            lines.append(f"  libraries ({len(prog.libraries)}):")
            shown = prog.libraries[:max_libraries]
            lines += _table([[lib.name, lib.path or "", f"via {lib.via}", f"needed by {lib.needed_by}"]
                             for lib in shown], indent="    ")
            if len(prog.libraries) > len(shown):
                lines.append(f"    ... and {len(prog.libraries) - len(shown)} more")
        if prog.missing:
            lines.append(f"  missing ({len(prog.missing)}):")
            lines += _table([[lib.name, f"needed by {lib.needed_by}"] for lib in prog.missing], indent="    ")

    if a.interpreter:
        i = a.interpreter
        lines += ["", "INTERPRETER"]
        rows = [["kind:", i.kind], ["binary:", i.binary], ["version:", i.version or "unknown"]]
        if i.script:
            rows.append(["script:", i.script])
        if i.module:
            rows.append(["module:", i.module])
        if i.inline:
            rows.append(["code:", "given on the command line"])
        lines += _table(rows)
        if i.code_trees:
            lines.append("  code trees:")
            lines += _table([[t.role, t.path] for t in i.code_trees], indent="    ")

    lines += ["", "REGIONS (the longest matching prefix decides each file)"]
    lines += _table([["MODE", "PATH", "RULE", "REASON"]]
                    + [[r.mode, r.path, r.rule, r.reason] for r in a.regions])

    e = a.enclave
    by = dict(e.rules)
    lines += ["", "ENCLAVE"]
    lines += _table([
        ["heap:", format_size(e.heap), f"({by.get('heap', 'built-in')})"],
        ["stack:", format_size(e.stack), f"({by.get('stack', 'built-in')})"],
        ["threads:", str(e.threads), f"({by.get('threads', 'built-in')})"],
        ["dlopen:", e.dlopen, f"({by.get('dlopen', 'built-in')})"],
    ])
    if a.environment:
        lines.append("  environment added by rules:")
        lines += [f"    {n}={v}  ({r})" for n, v, r in a.environment]
    lines.append(f"  rules matched: {', '.join(a.rules_matched) or 'none'}")
    for name, old, new in a.rules_replaced:
        lines.append(f"  rule {name} from {new} replaces {old}")

    lines += _findings("WARNINGS", a.warnings)
    lines += _findings("NOTES", a.notes)

    t = a.tree
    lines += ["", "TREE",
              f"  {t.entries} entries: {t.files} files, {t.directories} directories, {t.symlinks} symlinks, "
              f"{t.other} other; {_mib(t.bytes)} in {len(t.layers)} layer{'s' if len(t.layers) != 1 else ''}"]
    lines += _table([[f"layer {x.index}", x.digest[:19], _mib(x.size), f"{x.entries} entries",
                      f"{x.whiteouts} whiteouts", f"{x.visible_entries} visible"] for x in t.layers], indent="    ")
    r = a.reads
    lines += ["", "READ",
              f"  header pass: {_mib(r.header_pass_compressed_bytes)} compressed, "
              f"{_mib(r.header_pass_uncompressed_bytes)} uncompressed",
              f"  total: {_mib(r.compressed_bytes)} compressed, {_mib(r.uncompressed_bytes)} uncompressed in "
              f"{1 + r.rounds} pass{'es' if r.rounds else ''}; {r.files_fetched} files read "
              f"({_mib(r.content_bytes)} of content looked at)"]
    return "\n".join(lines)
