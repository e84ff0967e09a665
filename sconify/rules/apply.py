"""Matching rules against the facts of an analysis and merging what the matching rules contribute.

Rules are applied lowest precedence first; for the same region path, enclave setting or environment name
the rule applied last wins. Regions of different paths all stay: the file system shield chooses per file
by the longest matching prefix.
"""

from __future__ import annotations

import fnmatch
import itertools
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sconify.rules.model import Condition, Rule, RuleSet

_VAR_RE = re.compile(r"\$\{([^}]+)\}")
_MAX_EXPANSION = 10000


@dataclass(frozen=True)
class RuleFacts:
    """What rules can look at: the command and program, labels, env names, ELF facts, paths of the image."""

    executables: tuple[str, ...]  # every program path or name along the chain, as written and resolved
    interpreter: str  # an interpreter kind, or "none"
    argv: tuple[str, ...]
    labels: Mapping[str, str]
    env_names: tuple[str, ...]
    elf: Mapping[str, Any]  # static, pie, libc of the final program; empty when it is not an ELF
    variables: Mapping[str, tuple[str, ...]]  # ${NAME} -> absolute paths
    exists: Callable[[str], bool] = field(compare=False)
    listdir: Callable[[str], list[str]] = field(compare=False)


@dataclass(frozen=True)
class ProposedRegion:
    """A region proposal with the rule that chose it and why."""

    path: str
    mode: str
    reason: str
    rule: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode, "reason": self.reason, "rule": self.rule}


@dataclass(frozen=True)
class Applied:
    """The merged contribution of the matching rules."""

    matched: tuple[str, ...]
    regions: tuple[ProposedRegion, ...]
    enclave: Mapping[str, tuple[Any, str]]  # setting -> (value, rule name)
    env: Mapping[str, tuple[str, str]]  # name -> (value, rule name)
    notes: tuple[tuple[str, str], ...]  # (rule name, note)


def _glob_any(patterns: tuple[str, ...], values: tuple[str, ...]) -> bool:
    for pattern in patterns:
        for value in values:
            if fnmatch.fnmatchcase(value, pattern):
                return True
            if "/" not in pattern and fnmatch.fnmatchcase(posixpath.basename(value), pattern):
                return True
    return False


def _path_present(pattern: str, facts: RuleFacts) -> bool:
    parent, name = posixpath.split(posixpath.normpath(pattern))
    if not any(c in name for c in "*?["):
        return facts.exists(pattern)
    return any(fnmatch.fnmatchcase(child, name) for child in facts.listdir(parent))


def _holds(cond: Condition, facts: RuleFacts) -> bool:
    if cond.executable and not _glob_any(cond.executable, facts.executables):
        return False
    if cond.interpreter and facts.interpreter not in cond.interpreter:
        return False
    if cond.argv and not _glob_any(cond.argv, facts.argv):
        return False
    for label, pattern in cond.labels:
        if label not in facts.labels or not fnmatch.fnmatchcase(facts.labels[label], pattern):
            return False
    if cond.paths and not any(_path_present(p, facts) for p in cond.paths):
        return False
    if cond.env and not any(fnmatch.fnmatchcase(n, p) for p in cond.env for n in facts.env_names):
        return False
    for key, want in cond.elf:
        if key not in facts.elf or facts.elf[key] != want:
            return False
    return True


def matches(rule: Rule, facts: RuleFacts) -> bool:
    """Whether a rule applies: all its direct conditions hold and, if it has ``any``, one of those holds."""
    if not _holds(rule.match_all, facts):
        return False
    return not rule.match_any or any(_holds(c, facts) for c in rule.match_any)


def expand_path(template: str, variables: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Every absolute path a region template stands for; none when a variable it uses has no value."""
    names = _VAR_RE.findall(template)
    if not names:
        return [_normal(template)]
    choices = [variables.get(n, ()) for n in names]
    if any(not c for c in choices):
        return []
    out = []
    pieces = _VAR_RE.split(template)  # literal, name, literal, name, ..., literal
    for combo in itertools.islice(itertools.product(*choices), _MAX_EXPANSION):
        text = "".join(piece if i % 2 == 0 else combo[i // 2] for i, piece in enumerate(pieces))
        out.append(_normal(text))
    return out


def _normal(path: str) -> str:
    out = posixpath.normpath("/" + path.lstrip("/"))
    return "/" + out.lstrip("/")


def region_sort_key(path: str) -> tuple[str, ...]:
    """Parents before children, siblings by name: the order regions are listed in."""
    return tuple(p for p in path.split("/") if p)


def apply_rules(ruleset: RuleSet, facts: RuleFacts) -> Applied:
    """Match every rule and merge the contributions of those that match, by precedence."""
    matched: list[str] = []
    regions: dict[str, ProposedRegion] = {}
    enclave: dict[str, tuple[Any, str]] = {}
    env: dict[str, tuple[str, str]] = {}
    notes: list[tuple[str, str]] = []
    for rule in ruleset.rules:
        if not matches(rule, facts):
            continue
        matched.append(rule.name)
        for region in rule.regions:
            for path in expand_path(region.path, facts.variables):
                if region.only_if_exists and not facts.exists(path):
                    continue
                regions[path] = ProposedRegion(path, region.mode, region.reason, rule.name)
        for key in ("heap", "stack", "threads", "dlopen"):
            value = getattr(rule.enclave, key)
            if value is not None:
                enclave[key] = (value, rule.name)
        for name, value in rule.env:
            env[name] = (value, rule.name)
        for note in rule.notes:
            if all(n != note for _, n in notes):
                notes.append((rule.name, note))
    ordered = tuple(regions[p] for p in sorted(regions, key=region_sort_key))
    return Applied(tuple(matched), ordered, enclave, env, tuple(notes))
