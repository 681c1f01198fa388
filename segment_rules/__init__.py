"""The segment rule language: parse YAML rule files, validate them, compile them."""

from segment_rules.compiler import CompiledRules, Evaluation, History
from segment_rules.errors import RuleError, RuleFileError
from segment_rules.explain import explain
from segment_rules.interpreter import Interpreter
from segment_rules.model import RuleSet, RuleWarning, Segment
from segment_rules.parser import load_rules_file, parse_rules
from segment_rules.taxonomy import Taxonomy, load_taxonomy, parse_taxonomy

__all__ = [
    "CompiledRules",
    "Evaluation",
    "History",
    "Interpreter",
    "RuleError",
    "RuleFileError",
    "RuleSet",
    "RuleWarning",
    "Segment",
    "Taxonomy",
    "explain",
    "load_rules_file",
    "load_taxonomy",
    "parse_rules",
    "parse_taxonomy",
]
