"""From argv to the program that finally runs: PATH lookup, symlinks, shebang lines, ``env``, shells and
wrapper scripts that end in ``exec "$@"``, as the kernel, runc and the shells would go."""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sconify.analyze import findings as fc
from sconify.analyze.command import join_in_image
from sconify.analyze.elf import is_elf
from sconify.analyze.findings import Finding
from sconify.analyze.interpreters import interpreter_kind
from sconify.analyze.view import ImageView
from sconify.errors import NotFoundError
from sconify.image.tarfs.entry import EntryKind
from sconify.image.tree import SymlinkLoopError

MAX_STEPS = 16  # programs, interpreters and wrappers followed before giving up
MAX_SHEBANG_DEPTH = 4  # Linux refuses deeper interpreter nesting (ELOOP)

# Inline shell commands that only hand over to their arguments: (pattern, uses $0).
_HANDOVER = (
    (re.compile(r'^\s*(exec\s+)?"?\$(0|\{0\})"?\s+"\$(@|\{@\})"\s*;?\s*$'), True),
    (re.compile(r'^\s*(exec\s+)?"\$(@|\{@\})"\s*;?\s*$'), False),
    (re.compile(r"^\s*(exec\s+)?\$(0|\{0\})\s+\$(@|\{@\})\s*;?\s*$"), True),
    (re.compile(r"^\s*(exec\s+)?\$(@|\{@\})\s*;?\s*$"), False),
)
_EXEC_ARGS_RE = re.compile(r'^\s*exec\s+"?\$(@|\{@\})"?\s*;?\s*$')
_ABS_PATH_RE = re.compile(r"(?<![\w$/.-])(/[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)+)")


@dataclass(frozen=True)
class Step:
    """One step of how the command reaches its program."""

    kind: str  # command, path-lookup, symlink, shebang, env, shell-script, wrapper, shell-inline, program,
    # referenced
    path: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "detail": self.detail}


@dataclass(frozen=True)
class Chain:
    """The result of following a command."""

    steps: tuple[Step, ...]
    programs: tuple[str, ...]  # every ELF program executed, in order (resolved paths)
    scripts: tuple[str, ...]  # every script run on the way (resolved paths)
    referenced: tuple[str, ...]  # programs and scripts named in an inline shell command
    executable: str | None  # the final program (resolved)
    invoked: str | None  # the final program as found (before symlinks)
    final_argv: tuple[str, ...]
    kind: str | None  # the final program's interpreter kind
    problems: tuple[Finding, ...] = ()
    warnings: tuple[Finding, ...] = ()
    notes: tuple[Finding, ...] = ()
    complete: bool = True  # False while some content it needs is not read yet


@dataclass
class _State:
    steps: list[Step] = field(default_factory=list)
    programs: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)
    referenced: list[str] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    complete: bool = True


def parse_shebang(head: bytes) -> tuple[str, str | None] | None:
    """(interpreter, optional argument) of a ``#!`` line as Linux splits it: the rest is one argument."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "surrogateescape").strip(" \t\r")
    if not line:
        return None
    parts = re.split(r"[ \t]+", line, maxsplit=1)
    interp = parts[0]
    arg = parts[1].strip(" \t") if len(parts) > 1 else None
    return interp, (arg or None)


def _last_command(text: str) -> str:
    """The last command line of a shell script, comments and blank lines skipped."""
    for line in reversed(text.splitlines()):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped
    return ""


def ends_in_exec_args(text: str) -> bool:
    """Whether a shell script hands over to its arguments at its end (``exec "$@"``)."""
    return bool(_EXEC_ARGS_RE.match(_last_command(text)))


def _lookup(name: str, path_dirs: Sequence[str], workdir: str, view: ImageView) -> tuple[str | None, str | None]:
    """The first executable regular file called ``name`` in PATH, as runc's exec.LookPath finds it."""
    for directory in path_dirs:
        base = join_in_image(workdir, directory or ".")
        candidate = posixpath.join(base, name)
        node = view.node(candidate)
        if node is not None and node.kind in (EntryKind.REGULAR, EntryKind.HARDLINK) and node.entry.mode & 0o111:
            return candidate, directory
    return None, None


def _split_env_args(args: Sequence[str], state: _State) -> tuple[list[str], list[str]]:
    """``env``'s operands: (NAME=VALUE assignments, the command and its arguments)."""
    assignments: list[str] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-u", "--unset", "-C", "--chdir"):
            i += 2
            continue
        if arg.startswith(("-S", "--split-string")):
            value = arg[2:] if arg.startswith("-S") and arg != "-S" else None
            if arg.startswith("--split-string="):
                value = arg.split("=", 1)[1]
            if value is None:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            try:
                split = shlex.split(value)
            except ValueError:
                split = value.split()
            args = args[: i + 1] + split + args[i + 1:]
            i += 1
            continue
        if arg.startswith("-") and arg != "-":
            i += 1
            continue
        if "=" in arg and not arg.startswith("="):
            assignments.append(arg)
            i += 1
            continue
        break
    return assignments, args[i:]


def follow_command(
    argv: Sequence[str], env: Mapping[str, str], path_dirs: Sequence[str], workdir: str, view: ImageView
) -> Chain:
    """Follow ``argv`` through the image until the program that finally runs (or a reason it cannot)."""
    st = _State()
    current = list(argv)
    shebang_arg_at: int | None = None  # index in ``current`` of an argument that came from a #! line
    shebang_depth = 0
    executable = invoked = kind = None
    final_argv: tuple[str, ...] = tuple(argv)
    if not argv:
        return Chain((), (), (), (), None, None, (), None)
    st.steps.append(Step("command", argv[0], "argv[0] of Entrypoint + Cmd"))
    for _ in range(MAX_STEPS):
        name = current[0]
        if not name:
            st.problems.append(Finding(fc.MISSING_EXECUTABLE, "the command's first item is empty, so there is no "
                                       "program to start; set an Entrypoint or Cmd."))
            break
        if "/" in name:
            path = join_in_image(workdir, name)
        else:
            found, directory = _lookup(name, path_dirs, workdir, view)
            if found is None:
                st.problems.append(Finding(
                    fc.MISSING_EXECUTABLE,
                    f"{name!r} is not an executable file in any directory of PATH ({':'.join(path_dirs)}), so the "
                    "container cannot start; fix the image's command or PATH.", name))
                break
            path = found
            st.steps.append(Step("path-lookup", path, f"{name!r} found in PATH directory {directory}"))
        try:
            real, hops = view.follow(path)
        except SymlinkLoopError as exc:
            st.problems.append(Finding(fc.SYMLINK_LOOP, f"the program {exc.message}, so the container cannot "
                                       "start; fix the links in the image.", path))
            break
        except NotFoundError:  # a directory on the way is missing: reported below as a missing program
            real, hops = path, []
        for link, target in hops:
            st.steps.append(Step("symlink", link, f"-> {target}"))
        node = view.node(real, follow=False)
        if node is None:
            st.problems.append(Finding(fc.MISSING_EXECUTABLE,
                                       f"the program {path} does not exist in the image"
                                       + (f" (it resolves to {real})" if real != path else "")
                                       + ", so the container cannot start; fix the image's command.", path))
            break
        if node.kind not in (EntryKind.REGULAR, EntryKind.HARDLINK):
            st.problems.append(Finding(fc.NOT_EXECUTABLE, f"the program {real} is a {node.kind}, not a file, so it "
                                       "cannot be executed; fix the image's command.", real))
            break
        if not node.entry.mode & 0o111:
            st.problems.append(Finding(fc.NOT_EXECUTABLE, f"the program {real} has no execute permission "
                                       f"(mode {node.entry.mode:04o}), so starting it fails; fix its mode.", real))
            break
        head = view.head(real)
        if head is None:
            if view.pending(real):
                st.complete = False
            else:
                st.problems.append(Finding(fc.NOT_EXECUTABLE, f"the program {real} has no content in the image (a "
                                           "hard link to a file that does not exist), so it cannot be executed.", real))
            break
        if head.startswith(b"#!"):
            shebang = parse_shebang(head)
            shebang_depth += 1
            if shebang is None or shebang_depth > MAX_SHEBANG_DEPTH:
                what = "an empty #! line" if shebang is None else "more than 4 nested #! interpreters"
                st.problems.append(Finding(fc.NOT_EXECUTABLE, f"the script {real} has {what}, so the kernel cannot "
                                           "run it; fix the script.", real))
                break
            interp, arg = shebang
            st.scripts.append(real)
            st.steps.append(Step("shebang", real, "#!" + interp + (f" {arg}" if arg else "")))
            current = [interp, *([arg] if arg else []), path, *current[1:]]
            shebang_arg_at = 1 if arg else None
            continue
        if not is_elf(head):
            st.problems.append(Finding(fc.NOT_EXECUTABLE, f"the program {real} is neither an ELF binary nor a #! "
                                       "script (exec format error); fix the image's command.", real))
            break
        st.programs.append(real)
        this_kind = interpreter_kind(name, real)  # busybox applets are known by the name they are invoked as
        if this_kind is None and posixpath.basename(real) == "busybox" and len(current) > 1 \
                and not current[1].startswith("-"):
            # "busybox sh script": the multi-call binary runs the applet named by its first argument
            this_kind = interpreter_kind(current[1], real)
            if this_kind is not None:
                current = current[1:]
        st.steps.append(Step("program", real, f"ELF program, invoked as {name}"))
        executable, invoked, kind, final_argv = real, path, this_kind, tuple(current)
        args = current[1:]
        if this_kind == "env":
            if shebang_arg_at == 1 and args and (" " in args[0] or "\t" in args[0]) and not args[0].startswith("-"):
                words = args[0].split()
                st.warnings.append(Finding(
                    "env-shebang-arguments",
                    f"the #! line runs env with {args[0]!r}; Linux passes that as one argument, so env looks for a "
                    f"program named {args[0]!r}; sconify reads it as {words}, which is what the policy's command "
                    "will say (use 'env -S' in the script for the same behaviour outside SCONE).", real))
                args = [*words, *args[1:]]
            assignments, rest = _split_env_args(args, st)
            if not rest:
                break
            st.steps.append(Step("env", real, "runs " + " ".join(rest[:1])
                                 + (f" with {' '.join(assignments)}" if assignments else "")))
            current = rest
            shebang_arg_at = None
            shebang_depth = 0  # env execs a new program
            continue
        shebang_arg_at = None
        if this_kind == "shell":
            handed = _shell(current, real, workdir, path_dirs, view, st)
            if handed is None:
                break
            current = handed
            shebang_depth = 0  # the shell execs a new program
            continue
        break
    else:
        st.warnings.append(Finding("chain-too-long", f"the command goes through more than {MAX_STEPS} programs and "
                                   "wrappers; sconify stopped following it."))
    if st.problems:
        executable = invoked = kind = None
    return Chain(tuple(st.steps), tuple(st.programs), tuple(st.scripts), tuple(st.referenced), executable, invoked,
                 final_argv, kind, tuple(st.problems), tuple(st.warnings), tuple(st.notes), st.complete)


def _shell(current: Sequence[str], shell: str, workdir: str, path_dirs: Sequence[str], view: ImageView,
           st: _State) -> list[str] | None:
    """A shell's arguments: the argv it hands over to (inline ``exec "$@"`` or a wrapper script), else None."""
    args = list(current[1:])
    i = 0
    inline = False
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 2
            continue
        if (arg.startswith("-") or arg.startswith("+")) and len(arg) > 1:
            if not arg.startswith("--") and "c" in arg[1:]:
                inline = True
            i += 1
            continue
        break
    operands = args[i:]
    if inline:
        if not operands:
            return None
        command = operands[0]
        dollar0 = operands[1:2]
        rest = operands[2:]
        for pattern, uses0 in _HANDOVER:
            if pattern.match(command):
                target = (dollar0 + rest) if uses0 else rest
                if target:
                    st.steps.append(Step("shell-inline", shell, f"-c {command!r} hands over to its arguments"))
                    return target
        for ref in _ABS_PATH_RE.findall(command):
            node = view.node(ref)
            if node is not None and node.kind in (EntryKind.REGULAR, EntryKind.HARDLINK):
                real = view.resolve(ref) or ref
                if real not in st.referenced:
                    st.referenced.append(real)
                    st.steps.append(Step("referenced", real, "named in the shell command"))
                head = view.head(real)
                if head is None:
                    continue
                if head.startswith(b"#!") and real not in st.scripts:
                    st.scripts.append(real)
                elif is_elf(head) and real not in st.programs:
                    st.programs.append(real)
        return None
    if not operands:
        return None
    script = operands[0]
    path = join_in_image(workdir, script)
    if "/" not in script and not view.is_file(path):
        # bash looks a script without a slash up in PATH when it is not in the working directory
        for directory in path_dirs:
            candidate = posixpath.join(join_in_image(workdir, directory or "."), script)
            if view.is_file(candidate):
                path = candidate
                break
    try:
        real = view.resolve(path, strict=True) or path
    except SymlinkLoopError as exc:
        st.problems.append(Finding(fc.SYMLINK_LOOP, f"the script {exc.message.rstrip('.')}, so the shell cannot "
                                   "run it; fix the links in the image.", path))
        return None
    if not view.is_file(real):
        st.problems.append(Finding(fc.MISSING_EXECUTABLE, f"the shell script {path} does not exist in the image, so "
                                   "the container cannot start; fix the image's command.", path))
        return None
    if real not in st.scripts:
        st.scripts.append(real)
    content = view.content(real)
    if content is None:
        st.complete = False
        return None
    if content.text is None:
        st.notes.append(Finding("script-not-read", f"the script {real} is too large or not text; sconify did not "
                                "look for an exec \"$@\" hand-over in it.", real))
        return None
    text = content.text.decode("utf-8", "replace")
    if not ends_in_exec_args(text):
        st.steps.append(Step("shell-script", real, f"run by {posixpath.basename(shell)}"))
        return None
    handed = operands[1:]
    if not handed:
        st.steps.append(Step("shell-script", real, "ends in exec \"$@\" but gets no arguments"))
        return None
    if handed[0].startswith("-"):
        st.steps.append(Step("shell-script", real, "ends in exec \"$@\"; its first argument is an option"))
        st.notes.append(Finding(
            "wrapper-option-argument",
            f"{real} ends in exec \"$@\" but its first argument {handed[0]!r} is an option; such wrappers usually "
            "put their own program in front, which sconify cannot know; the shell is taken as the program.", real))
        return None
    st.steps.append(Step("wrapper", real, f"ends in exec \"$@\": hands over to {handed[0]}"))
    return handed

