"""Parsing ``rule:`` conditions over a cookie's event history."""

from __future__ import annotations

from segment_rules.fields import field_kind
from segment_rules.model import (
    Aggregate,
    AggregateFunc,
    Condition,
    CountWithin,
    FieldTest,
    FirstSeenWithin,
    Leaf,
    NotSeenWithin,
    Predicate,
    Score,
    ScoreEntry,
    SequenceRule,
)
from segment_rules.parse_predicates import PredicateParser
from segment_rules.yaml_source import YNode

MAX_COUNT = 1000  # per-cookie history is bounded by the largest count a rule asks for
LEAF_HELP = (
    "a rule is one of: 'at_least'/'at_most' N 'within' D 'where' T; 'last_seen_within', "
    "'not_seen_within' or 'first_seen_within' D 'where' T; 'sum'/'average' of a field with "
    "'at_least'/'at_most' X 'within' D; 'sequence' of tests 'then_within' D 'within' D; "
    "'score' entries 'at_least' X 'within' or 'half_life' D; or all/any/not of rules"
)


class ConditionParser(PredicateParser):
    def condition(self, node: YNode) -> Condition:
        return self.boolean(node, self.leaf, "conditions")

    def leaf(self, node: YNode) -> Leaf:
        if not node.is_mapping:
            raise self.fail(node.loc, LEAF_HELP)
        keys = node.value
        if "sequence" in keys:
            return self._sequence(node)
        if "score" in keys:
            return self._score(node)
        if "sum" in keys or "average" in keys:
            return self._aggregate(node)
        if "not_seen_within" in keys:
            return self._not_seen(node)
        if "first_seen_within" in keys:
            return self._first_seen(node)
        if "last_seen_within" in keys:
            self.unknown_keys(node, ("last_seen_within", "where"), "a last_seen_within rule")
            within = self.window(keys["last_seen_within"])
            return CountWithin(1, within, self._where(node))
        if "where" not in keys:
            raise self.fail(node.loc, LEAF_HELP)
        return self._count(node)

    def _where(self, node: YNode, default: FieldTest | None = None) -> Predicate:
        where = node.value.get("where")
        if where is None:
            if default is not None:
                return default
            raise self.fail(node.loc, "the rule needs 'where: <event test>'")
        return self.predicate(where)

    def _count(self, node: YNode) -> CountWithin:
        self.unknown_keys(node, ("at_least", "at_most", "within", "where"), "a rule")
        values = node.value
        at_most = None
        if "at_most" in values:
            at_most = self.count(values["at_most"], "at_most", minimum=0, maximum=MAX_COUNT)
        at_least_node = values.get("at_least")
        if at_least_node is None:
            at_least = 1 if at_most is None else 0
        else:
            at_least = self.count(at_least_node, "at_least", minimum=1, maximum=MAX_COUNT)
        if at_most is not None and at_most < at_least:
            raise self.fail(
                values["at_most"].loc, f"'at_most' {at_most} is below 'at_least' {at_least}"
            )
        if "within" not in values:
            raise self.fail(node.loc, "a rule needs 'within: <duration>', e.g. 'within: 14d'")
        within = self.window(values["within"])
        return CountWithin(at_least, within, self.predicate(values["where"]), at_most)

    def _not_seen(self, node: YNode) -> NotSeenWithin:
        self.unknown_keys(node, ("not_seen_within", "seen_within", "where"), "a lapsed rule")
        values = node.value
        within = self.window(values["not_seen_within"])
        lookback = self.retention
        if "seen_within" in values:
            lookback = self.window(values["seen_within"])
        if lookback <= within:
            loc = values["seen_within"].loc if "seen_within" in values else node.loc
            raise self.fail(
                loc,
                "'seen_within' must be longer than 'not_seen_within' (it looks further back); "
                "lengthen it",
            )
        return NotSeenWithin(within, lookback, self._where(node))

    def _first_seen(self, node: YNode) -> FirstSeenWithin:
        self.unknown_keys(node, ("first_seen_within", "where"), "a first_seen_within rule")
        within = self.window(node.value["first_seen_within"])
        return FirstSeenWithin(within, self.retention, self._where(node))

    def _aggregate(self, node: YNode) -> Aggregate:
        values = node.value
        func: AggregateFunc = "sum" if "sum" in values else "average"
        self.unknown_keys(node, (func, "at_least", "at_most", "within", "where"), f"a {func} rule")
        field_node = values[func]
        name = field_node.value
        path = tuple(name.split(".")) if isinstance(name, str) else ()
        if field_kind(path) != "any":
            raise self.fail(
                field_node.loc,
                f"'{func}' takes a numeric event field such as attrs.cart_value, got {field_node.plain()!r}",
            )
        at_least = self.number(values["at_least"], "at_least") if "at_least" in values else None
        at_most = self.number(values["at_most"], "at_most") if "at_most" in values else None
        if at_least is None and at_most is None:
            raise self.fail(node.loc, f"a {func} rule needs 'at_least' and/or 'at_most'")
        if at_least is not None and at_most is not None and at_most < at_least:
            raise self.fail(values["at_most"].loc, "'at_most' is below 'at_least'")
        if "within" not in values:
            raise self.fail(node.loc, f"a {func} rule needs 'within: <duration>', e.g. '30d'")
        within = self.window(values["within"])
        where = self._where(node, FieldTest(path, "exists", None))
        return Aggregate(func, path, within, where, at_least, at_most)

    def _sequence(self, node: YNode) -> SequenceRule:
        self.unknown_keys(node, ("sequence", "then_within", "within"), "a sequence rule")
        values = node.value
        steps_node = values["sequence"]
        if not steps_node.is_sequence or len(steps_node.value) < 2:
            raise self.fail(
                steps_node.loc, "'sequence' takes a list of two or more event tests, in order"
            )
        steps = tuple(self.predicate(s) for s in steps_node.value)
        for key in ("then_within", "within"):
            if key not in values:
                raise self.fail(
                    node.loc,
                    "a sequence needs 'then_within: <duration>' (first step to last) and "
                    "'within: <duration>' (how recent the last step is)",
                )
        span = self.window(values["then_within"])
        within = self.window(values["within"])
        return SequenceRule(steps, span, within)

    def _score(self, node: YNode) -> Score:
        self.unknown_keys(node, ("score", "at_least", "within", "half_life"), "a score rule")
        values = node.value
        entries_node = values["score"]
        if not entries_node.is_sequence or not entries_node.value:
            raise self.fail(
                entries_node.loc, "'score' takes a list of '{points: N, where: <event test>}'"
            )
        entries = tuple(self._score_entry(e) for e in entries_node.value)
        if "at_least" not in values:
            raise self.fail(node.loc, "a score needs a threshold: 'at_least: <points>'")
        at_least = self.number(values["at_least"], "at_least", positive=True)
        if ("within" in values) == ("half_life" in values):
            raise self.fail(
                node.loc,
                "a score needs exactly one of 'within: <duration>' (points of events in the "
                "window) or 'half_life: <duration>' (points that decay)",
            )
        within = self.window(values["within"]) if "within" in values else None
        half_life = self.window(values["half_life"], "half_life") if "half_life" in values else None
        return Score(entries, at_least, within, half_life, self.retention)

    def _score_entry(self, node: YNode) -> ScoreEntry:
        if not node.is_mapping or "points" not in node.value or "where" not in node.value:
            raise self.fail(node.loc, "a score entry is '{points: N, where: <event test>}'")
        self.unknown_keys(node, ("points", "where"), "a score entry")
        points = self.number(node.value["points"], "points", positive=True)
        return ScoreEntry(points, self.predicate(node.value["where"]))
