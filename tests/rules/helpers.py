"""Small helpers for the rule tests: compile a YAML text, feed events, read memberships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segment_rules import CompiledRules, History, Taxonomy, load_taxonomy, parse_rules
from segment_rules.interpreter import Interpreter

DAY = 86400.0
HOUR = 3600.0
NOW = 1_800_000_000.0
TAXONOMY_TSV = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "taxonomy"
    / "audience-taxonomy-1.1.tsv"
)


def iab() -> Taxonomy:
    return load_taxonomy(TAXONOMY_TSV)


class Cookie:
    """One cookie's history under a compiled rule file, checked against the interpreter."""

    def __init__(self, text: str, taxonomy: Taxonomy | None = None) -> None:
        ruleset = parse_rules(text, "t.yaml", taxonomy)
        self.rules = CompiledRules(ruleset)
        self.interpreter = Interpreter(ruleset)
        self.history: History = {}
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.recorded_at = NOW

    def see(self, ts: float, now: float = NOW, **event: Any) -> None:
        event.setdefault("type", "page_view")
        self.rules.record(self.history, ts, self.rules.matching_traits(event), now, event)
        self.events.append((ts, event))
        self.recorded_at = now

    def members(self, t: float) -> frozenset[str]:
        self.rules.prune(self.history, t)
        found = self.rules.evaluate(self.history, t).members
        assert found == self.interpreter.members(self.events, t, self.recorded_at)
        return found

    def next_change(self, t: float) -> float | None:
        return self.rules.evaluate(self.history, t).next_change

    def all_members(self, t: float) -> list[str]:
        return self.rules.with_composites(self.members(t))
