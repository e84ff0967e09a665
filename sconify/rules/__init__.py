"""Rules: YAML files that say which regions, enclave settings, environment and notes fit what an image runs."""

from sconify.rules.apply import Applied, RuleFacts, apply_rules, matches
from sconify.rules.loader import RuleIssue, check_dir, load_rules, shipped_rules_dir
from sconify.rules.model import Condition, EnclaveRule, RegionRule, Rule, RuleSet, format_size, parse_size

__all__ = [
    "Applied",
    "Condition",
    "EnclaveRule",
    "RegionRule",
    "Rule",
    "RuleFacts",
    "RuleIssue",
    "RuleSet",
    "apply_rules",
    "check_dir",
    "format_size",
    "load_rules",
    "matches",
    "parse_size",
    "shipped_rules_dir",
]
