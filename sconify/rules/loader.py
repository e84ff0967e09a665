"""Reading rule files: YAML with line numbers, JSON Schema validation, shipped and user directories, precedence.

Shipped rules live in the top-level ``rules/`` directory of the source tree; an installed package that has
no such directory next to it reads ``sconify/data/rules`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sconify.errors import UsageError
from sconify.rules.model import Condition, EnclaveRule, RegionRule, Rule, RuleSet, parse_size
from sconify.rules.schema import CODE_PREFIX, RULE_SCHEMA, VARIABLES

RULE_SUFFIXES = (".yaml", ".yml")
_VAR_RE = re.compile(r"\$\{([^}]*)\}")
_VALIDATOR: Any = None

if TYPE_CHECKING:
    import jsonschema


def _validator() -> Any:
    """The rule schema's validator; jsonschema is imported on first use (it costs ~20 ms at start-up)."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema

        _VALIDATOR = jsonschema.Draft202012Validator(RULE_SCHEMA)
    return _VALIDATOR


def shipped_rules_dir() -> Path:
    """The directory of the rules that come with sconify."""
    package = Path(__file__).resolve().parent.parent  # .../sconify
    for candidate in (package.parent / "rules", package / "data" / "rules"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return package.parent / "rules"


@dataclass(frozen=True)
class RuleIssue:
    """One thing wrong with a rule file: where (file, line) and what."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "message": self.message}


def _node_at(node: yaml.Node | None, path: Iterable[Any]) -> yaml.Node | None:
    """The YAML node at a JSON path (keys and indexes), or the deepest node that exists on the way."""
    for key in path:
        if isinstance(node, yaml.MappingNode):
            found = None
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                    found = v
                    break
            if found is None:
                return node
            node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node
    return node


def _key_node(node: yaml.Node | None, path: list[Any], key: str) -> yaml.Node | None:
    """The node of mapping key ``key`` under ``path`` (for errors about an unexpected property)."""
    parent = _node_at(node, path)
    if isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k
    return parent


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _duplicate_keys(node: yaml.Node, file: str) -> list[RuleIssue]:
    issues = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in seen:
                    issues.append(RuleIssue(file, _line(k), f"the key {k.value!r} appears twice"))
                seen.add(k.value)
            issues += _duplicate_keys(v, file)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            issues += _duplicate_keys(item, file)
    return issues


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "the file"
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        allowed = sorted((error.schema.get("properties") or {}).keys())
        names = ", ".join(repr(e) for e in extra) or "a key"
        return f"{where}: {names} is not a known key here (known: {', '.join(allowed)})"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern":
        return f"{where}: {error.instance!r} does not have the required form ({error.validator_value})"
    if error.validator == "oneOf":
        return f"{where}: {error.instance!r} has the wrong type or form"
    return f"{where}: {error.message}"


def _variable_issues(data: dict[str, Any], root: yaml.Node, file: str) -> list[RuleIssue]:
    issues = []
    for i, region in enumerate(data.get("regions") or []):
        if not isinstance(region, dict) or not isinstance(region.get("path"), str):
            continue
        path = region["path"]
        line = _line(_node_at(root, ["regions", i, "path"]))
        for name in _VAR_RE.findall(path):
            if name not in VARIABLES and not (name.startswith(CODE_PREFIX) and len(name) > len(CODE_PREFIX)):
                known = ", ".join(sorted(VARIABLES)) + ", code.ROLE"
                issues.append(RuleIssue(file, line, f"regions/{i}/path: unknown variable ${{{name}}} "
                                                    f"(known: {known})"))
        stripped = _VAR_RE.sub("", path)
        if "$" in stripped:
            issues.append(RuleIssue(file, line, f"regions/{i}/path: {path!r} has a '$' outside a ${{NAME}}"))
        if ".." in path.split("/"):
            issues.append(RuleIssue(file, line, f"regions/{i}/path: {path!r} has a '..' component"))
    for key in ("heap", "stack"):
        value = (data.get("enclave") or {}).get(key) if isinstance(data.get("enclave"), dict) else None
        if isinstance(value, str):
            try:
                parse_size(value)
            except ValueError as exc:
                issues.append(RuleIssue(file, _line(_node_at(root, ["enclave", key])), f"enclave/{key}: {exc}"))
    return issues


# libyaml's safe loader when PyYAML has it (about ten times faster; the same documents, marks and errors).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_rule_text(text: str, file: str, *, schema: bool = True) -> tuple[dict[str, Any] | None, list[RuleIssue]]:
    """Parse and validate one rule file's text; returns the data (None if unusable) and every issue found.

    ``schema=False`` skips the JSON Schema (for the shipped rules, which the test suite validates); every other
    check still runs.
    """
    try:
        root = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        return None, [RuleIssue(file, line, f"not valid YAML: {exc.problem or exc}")]
    except yaml.YAMLError as exc:
        return None, [RuleIssue(file, None, f"not valid YAML: {exc}")]
    if root is None or data is None:
        return None, [RuleIssue(file, 1, "the file is empty; a rule needs at least a name")]
    if not isinstance(data, dict):
        return None, [RuleIssue(file, _line(root), "a rule file must be a mapping (name:, match:, regions:, ...)")]
    issues = _duplicate_keys(root, file)
    errors = _validator().iter_errors(data) if schema else ()
    for error in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        path = list(error.absolute_path)
        node = _node_at(root, path)
        if error.validator == "additionalProperties":
            extra = re.findall(r"'([^']+)' was unexpected", error.message)
            if extra:
                node = _key_node(root, path, extra[0])
        issues.append(RuleIssue(file, _line(node), _describe(error)))
    if not issues:
        issues += _variable_issues(data, root, file)
    return (None if issues else data), issues


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _condition(obj: dict[str, Any]) -> Condition:
    return Condition(
        executable=_strings(obj.get("executable")),
        interpreter=_strings(obj.get("interpreter")),
        argv=_strings(obj.get("argv")),
        labels=tuple(sorted((str(k), str(v)) for k, v in (obj.get("labels") or {}).items())),
        paths=_strings(obj.get("paths")),
        env=_strings(obj.get("env")),
        elf=tuple(sorted((obj.get("elf") or {}).items())),
    )


def rule_from_data(data: dict[str, Any], source: str, rank: int) -> Rule:
    """A ``Rule`` from validated rule-file data."""
    match = data.get("match") or {}
    enclave = data.get("enclave") or {}
    return Rule(
        name=data["name"],
        description=str(data.get("description") or ""),
        priority=int(data.get("priority", 50)),
        match_all=_condition({k: v for k, v in match.items() if k != "any"}),
        match_any=tuple(_condition(c) for c in match.get("any") or ()),
        regions=tuple(
            RegionRule(r["path"], r["mode"], r["reason"], bool(r.get("only_if_exists", False)))
            for r in data.get("regions") or ()
        ),
        enclave=EnclaveRule(
            heap=parse_size(enclave["heap"]) if "heap" in enclave else None,
            stack=parse_size(enclave["stack"]) if "stack" in enclave else None,
            threads=enclave.get("threads"),
            dlopen=enclave.get("dlopen"),
        ),
        env=tuple(sorted((str(k), str(v)) for k, v in (data.get("env") or {}).items())),
        notes=tuple(data.get("notes") or ()),
        source=source,
        rank=rank,
    )


def rule_files(directory: Path) -> list[Path]:
    """The rule files of a directory (``*.yaml``, ``*.yml``), in name order; subdirectories are not read."""
    return sorted(p for p in directory.iterdir() if p.suffix in RULE_SUFFIXES and p.is_file())


def check_dir(directory: Path, *, schema: bool = True) -> tuple[list[Rule], list[RuleIssue]]:
    """Every rule of a directory and every issue found in it (files, lines, what is wrong)."""
    if not directory.is_dir():
        raise UsageError(f"rule directory {str(directory)!r} does not exist; give a directory of *.yaml rule files.")
    rules: list[Rule] = []
    issues: list[RuleIssue] = []
    names: dict[str, str] = {}
    for path in rule_files(directory):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(RuleIssue(str(path), None, f"cannot be read ({exc})"))
            continue
        data, found = parse_rule_text(text, str(path), schema=schema)
        issues += found
        if data is None:
            continue
        rule = rule_from_data(data, str(path), 0)
        if rule.name in names:
            issues.append(RuleIssue(str(path), 1, f"rule name {rule.name!r} is also used by {names[rule.name]}"))
            continue
        names[rule.name] = str(path)
        rules.append(rule)
    return rules, issues


def _load_dir(directory: Path, rank: int, *, schema: bool = True) -> list[Rule]:
    rules, issues = check_dir(directory, schema=schema)
    if issues:
        more = f" (and {len(issues) - 1} more problems)" if len(issues) > 1 else ""
        raise UsageError(f"invalid rule file {issues[0]}{more}; run 'sconify rules check {directory}' for all.")
    return [replace(r, rank=rank) for r in rules]


def load_rules(user_dirs: Sequence[Path | str] = (), shipped: Path | None = None) -> RuleSet:
    """The shipped rules overridden by the user's directories (later directories win; same name replaces)."""
    by_name: dict[str, Rule] = {}
    replaced: list[tuple[str, str, str]] = []
    for rank, directory in enumerate([shipped or shipped_rules_dir(), *map(Path, user_dirs)]):
        # The rules shipped with sconify are checked against the schema by the test suite, not at every start.
        for rule in _load_dir(Path(directory), rank, schema=not (rank == 0 and shipped is None)):
            if rule.name in by_name:
                replaced.append((rule.name, by_name[rule.name].source, rule.source))
            by_name[rule.name] = rule
    ordered = sorted(by_name.values(), key=Rule.precedence)
    return RuleSet(tuple(ordered), tuple(replaced))
