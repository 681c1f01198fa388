"""The segment rule language: parse YAML rule files, validate them, compile them."""

from segment_rules.compiler import CompiledRules, Evaluation, History
from segment_rules.errors import RuleError, RuleFileError
from segment_rules.model import RuleSet, Segment
from segment_rules.parser import load_rules_file, parse_rules

__all__ = [
    "CompiledRules",
    "Evaluation",
    "History",
    "RuleError",
    "RuleFileError",
    "RuleSet",
    "Segment",
    "load_rules_file",
    "parse_rules",
]
