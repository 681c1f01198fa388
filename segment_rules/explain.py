"""A rule read back in plain English, for ad ops (``dmp rules explain SEGMENT``)."""

from __future__ import annotations

from segment_rules.durations import format_duration
from segment_rules.model import (
    Aggregate,
    All,
    AnyOf,
    Composite,
    Condition,
    CountWithin,
    FieldTest,
    FirstSeenWithin,
    Not,
    NotSeenWithin,
    Predicate,
    RuleSet,
    Score,
    Segment,
    SegmentRef,
    SequenceRule,
)
from segment_rules.taxonomy import Taxonomy

_UNITS = {"w": "week", "d": "day", "h": "hour", "m": "minute", "s": "second"}


def human_duration(seconds: float) -> str:
    text = format_duration(seconds)
    number, unit = text[:-1], text[-1]
    if unit == "w":  # "14 days" reads better than "2 weeks" next to "30 days"
        number, unit = str(int(number) * 7), "d"
    return f"{number} {_UNITS[unit]}{'' if number == '1' else 's'}"


def explain(
    segment: Segment, ruleset: RuleSet | None = None, taxonomy: Taxonomy | None = None
) -> str:
    """A paragraph: what the segment is, when a cookie is in it, and for how long."""
    reader = _Reader(ruleset, taxonomy)
    lines = [
        f"{segment.name} ({segment.id})"
        + (f": {segment.description}" if segment.description else "")
    ]
    facts = [f"status {segment.status}"]
    if segment.owner:
        facts.append(f"owner {segment.owner}")
    lines.append("; ".join(facts).capitalize() + ".")
    if segment.iab_ids:
        lines.append(
            "IAB Audience Taxonomy: " + ", ".join(reader.iab(i) for i in segment.iab_ids) + "."
        )
    if segment.partners:
        lines.append(
            "Partner ids: " + ", ".join(f"{p} = {theirs}" for p, theirs in segment.partners) + "."
        )
    if segment.rule is not None:
        lines.append(f"A cookie is in it when {reader.condition(segment.rule)}.")
    else:
        assert segment.of is not None
        lines.append(f"A cookie is in it when {reader.composite(segment.of)}.")
    if segment.ttl is not None:
        lines.append(
            f"Membership ends {human_duration(segment.ttl)} after the last qualifying event, "
            "unless the cookie qualifies again."
        )
    if segment.status == "paused":
        lines.append("It is paused: nobody is in it until it is set active.")
    return "\n".join(lines)


class _Reader:
    def __init__(self, ruleset: RuleSet | None, taxonomy: Taxonomy | None) -> None:
        self.ruleset = ruleset
        self.taxonomy = taxonomy

    def iab(self, taxonomy_id: int) -> str:
        if self.taxonomy is not None and taxonomy_id in self.taxonomy:
            return f"{taxonomy_id} ({self.taxonomy.name(taxonomy_id)})"
        return str(taxonomy_id)

    # -- event tests ------------------------------------------------------------------------
    def predicate(self, pred: Predicate) -> str:
        if isinstance(pred, FieldTest):
            return self.field_test(pred)
        if isinstance(pred, Not):
            return f"not ({self.predicate(pred.part)})"
        word = " and " if isinstance(pred, All) else " or "
        parts = [self.predicate(p) for p in pred.parts]
        return parts[0] if len(parts) == 1 else "(" + word.join(parts) + ")"

    def field_test(self, test: FieldTest) -> str:
        name, op, value = ".".join(test.path), test.op, test.value

        def quoted(v: object) -> str:
            return f'"{v}"' if isinstance(v, str) else str(v)

        if isinstance(value, frozenset):
            listed = ", ".join(quoted(v) for v in sorted(value, key=repr))
        phrases = {
            "equals": lambda: f"{name} is {quoted(value)}",
            "not_equals": lambda: f"{name} is not {quoted(value)}",
            "in": lambda: f"{name} is one of {listed}",
            "not_in": lambda: f"{name} is none of {listed}",
            "prefix": lambda: f"{name} starts with {quoted(value)}",
            "suffix": lambda: f"{name} ends with {quoted(value)}",
            "contains": lambda: f"{name} contains {quoted(value)}",
            "regex": lambda: f"{name} matches the pattern /{value}/",
            "gt": lambda: f"{name} is more than {value:g}",
            "gte": lambda: f"{name} is at least {value:g}",
            "lt": lambda: f"{name} is less than {value:g}",
            "lte": lambda: f"{name} is at most {value:g}",
            "between": lambda: f"{name} is between {value[0]:g} and {value[1]:g}",  # type: ignore[index]  # a pair
            "exists": lambda: f"{name} is present",
            "missing": lambda: f"{name} is absent",
            "under": lambda: (
                f"{name} is {quoted(value)} or below it ({quoted(str(value) + '/...')})"
            ),
            "under_iab": lambda: f"{name} is IAB {self.iab(int(value))} or an id below it",  # type: ignore[arg-type]  # an id
            "host": lambda: f"the host of {name} is {quoted(value)}",
            "host_suffix": lambda: f"the host of {name} is {quoted(value)} or a subdomain of it",
            "path_prefix": lambda: f"the path of {name} starts with {quoted(value)}",
        }
        text = phrases[op]()
        if name == "categories" and op not in ("exists", "missing", "not_equals", "not_in"):
            text = "a category" + text[len(name) :]
        return text

    # -- history conditions -----------------------------------------------------------------
    def condition(self, cond: Condition) -> str:
        if isinstance(cond, Not):
            return f"it is not true that {self.condition(cond.part)}"
        if isinstance(cond, All | AnyOf):
            parts = [self.condition(p) for p in cond.parts]
            if len(parts) == 1:
                return parts[0]
            word = "all of these hold" if isinstance(cond, All) else "at least one of these holds"
            return f"{word}: " + "; ".join(f"({n}) {p}" for n, p in enumerate(parts, start=1))
        return self.leaf(cond)

    def leaf(self, cond: Condition) -> str:
        if isinstance(cond, CountWithin):
            window = f"within the last {human_duration(cond.within)}"
            where = self.predicate(cond.where)
            if cond.at_most is None:
                many = "one event" if cond.at_least == 1 else f"{cond.at_least} events"
                return f"it has at least {many} {window} where {where}"
            if cond.at_least == 0:
                return f"it has at most {cond.at_most} events {window} where {where}"
            return f"it has {cond.at_least} to {cond.at_most} events {window} where {where}"
        if isinstance(cond, NotSeenWithin):
            return (
                f"it had an event where {self.predicate(cond.where)} within the last "
                f"{human_duration(cond.lookback)}, but none within the last "
                f"{human_duration(cond.within)} (a lapsed user)"
            )
        if isinstance(cond, FirstSeenWithin):
            return (
                f"its first event where {self.predicate(cond.where)} was within the last "
                f"{human_duration(cond.within)} (a new user; events are remembered until "
                f"{human_duration(cond.memory)} pass without one)"
            )
        if isinstance(cond, Aggregate):
            bounds = []
            if cond.at_least is not None:
                bounds.append(f"at least {cond.at_least:g}")
            if cond.at_most is not None:
                bounds.append(f"at most {cond.at_most:g}")
            return (
                f"the {cond.func} of {'.'.join(cond.path)} over its events within the last "
                f"{human_duration(cond.within)} where {self.predicate(cond.where)} is "
                + " and ".join(bounds)
            )
        if isinstance(cond, SequenceRule):
            steps = ", then ".join(f"an event where {self.predicate(s)}" for s in cond.steps)
            return (
                f"it had {steps}, first to last within {human_duration(cond.span)}, the last "
                f"within the last {human_duration(cond.within)}"
            )
        assert isinstance(cond, Score)
        entries = ", ".join(
            f"{e.points:g} point{'' if e.points == 1 else 's'} per event where {self.predicate(e.where)}"
            for e in cond.entries
        )
        if cond.within is not None:
            how = f"over the last {human_duration(cond.within)}"
        else:
            assert cond.half_life is not None
            how = f"with each event's points halving every {human_duration(cond.half_life)}"
        return f"its score is at least {cond.at_least:g}, counting {entries}, {how}"

    # -- segments of segments ---------------------------------------------------------------
    def composite(self, expr: Composite) -> str:
        if isinstance(expr, SegmentRef):
            name = ""
            if self.ruleset is not None:
                try:
                    name = f" ({self.ruleset.segment(expr.segment_id).name})"
                except KeyError:
                    name = ""
            return f"it is in {expr.segment_id}{name}"
        if isinstance(expr, Not):
            return f"not ({self.composite(expr.part)})"
        word = " and " if isinstance(expr, All) else " or "
        parts = [self.composite(p) for p in expr.parts]
        return parts[0] if len(parts) == 1 else "(" + word.join(parts) + ")"
