"""Hypothesis strategies: random events and random rule files (as YAML documents)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from segment_rules.taxonomy import Taxonomy, parse_taxonomy

TYPES = ["page_view", "click", "conversion", "search"]
CATEGORIES = ["auto", "auto/new-cars", "auto/new-cars/suv", "auto/used", "news", "travel/air"]
URLS = [
    "https://cars.example/new/suv",
    "https://www.cars.example/models/a",
    "https://dealers.cars.example/dealers/1",
    "https://news.example/auto/",
    "https://badcars.example/models/x",
    "not a url",
    # Shapes the memo's URL cut must get right (segment_rules.event_memo): the same start
    # with another tail, a host ended by '?' or '#', no path, a port, user, capitals.
    "https://www.cars.example/models/b?x=1",
    "https://www.cars.example/models",
    "https://www.cars.example/mo",
    "https://cars.example?q=/models/x",
    "https://cars.example#/models/",
    "https://cars.example",
    "http://www.cars.example/models/a",
    "http:///models/x/y",
    "https://u@cars.example:8443/models/a",
    "HTTPS://CARS.EXAMPLE/models/a",
]
DURATIONS = ["1h", "6h", "1d", "2d", "3d", "7d"]
STEP = 1800.0  # event times and evaluation times fall on a half-hour grid: exact boundaries


def small_taxonomy() -> Taxonomy:
    rows = [("1", "", "Interest"), ("2", "1", "Autos"), ("3", "2", "SUVs"), ("4", "1", "News")]
    lines = ["\tUnique ID\tParent ID\tName\tTier 1\tTier 2\tTier 3"]
    for node_id, parent, name in rows:
        lines.append(f"\t{node_id}\t{parent}\t{name}\t{name}\t\t")
    return parse_taxonomy("\r\n".join(lines), "small.tsv")


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {"type": draw(st.sampled_from(TYPES))}
    if draw(st.booleans()):
        event["categories"] = draw(
            st.one_of(
                st.lists(st.sampled_from(CATEGORIES), max_size=3),
                st.sampled_from(["auto", 7, ["auto", 7]]),  # not a list of text
            )
        )
    if draw(st.booleans()):
        event["url"] = draw(st.sampled_from(URLS))
    if draw(st.integers(0, 9)) == 0:
        event["geo"] = draw(st.sampled_from(["USA", ["USA"], {"country": {"x": 1}}]))
    elif draw(st.booleans()):
        event["geo"] = {
            k: draw(st.sampled_from(v))
            for k, v in (
                ("country", ["USA", "CAN"]),
                ("region", ["CA", "NY"]),
                ("metro", ["803", "501"]),
            )
            if draw(st.booleans())
        }
    attrs: dict[str, Any] = {}
    if draw(st.integers(0, 3)):
        attrs["cart_value"] = draw(
            st.sampled_from([0, 1, 10, 49.5, 100, 250, 60, "100", True, [5]])
        )
    if draw(st.booleans()):
        attrs["plan"] = draw(
            st.sampled_from(["gold", "silver", ["gold", "bronze"], 1, 1.0, True, [{"a": 1}]])
        )
    if draw(st.booleans()):
        attrs["query"] = draw(st.sampled_from(["electric suv", "ev deals", "diesel", ""]))
    if draw(st.booleans()):
        attrs["ids"] = draw(st.lists(st.sampled_from(["2", "3", 3, "4", "9", True]), max_size=2))
    if attrs:
        event["attrs"] = attrs
    return event


@st.composite
def urls(draw: st.DrawFn) -> str:
    """URLs that share their start but not their tail: what the memo's URL cut must tell
    apart (segment_rules.event_memo)."""
    scheme = draw(st.sampled_from(["https://", "http://", "HTTPS://", "//", ""]))
    host = draw(st.sampled_from(["cars.example", "www.cars.example", "u@cars.example:8443"]))
    path = draw(st.sampled_from(["", "/", "/m", "/mo", "/models", "/models/", "/models/a/b"]))
    tail = draw(st.text(alphabet="/?#ab", max_size=3))
    return scheme + host + path + tail


FIELD_TESTS = [
    {"field": "type", "equals": "page_view"},
    {"field": "type", "equals": "click"},
    {"field": "type", "in": ["click", "conversion"]},
    {"field": "type", "not_equals": "search"},
    {"field": "categories", "under": "auto"},
    {"field": "categories", "under": "auto/new-cars"},
    {"field": "categories", "equals": "news"},
    {"field": "categories", "prefix": "auto/n"},
    {"field": "categories", "not_in": ["news", "travel/air"]},
    {"field": "categories", "exists": True},
    {"field": "geo.country", "equals": "USA"},
    {"field": "geo.metro", "in": [803, "501"]},
    {"field": "geo.region", "missing": True},
    {"field": "url", "host_suffix": "cars.example"},
    {"field": "url", "host": "www.cars.example"},
    {"field": "url", "path_prefix": "/models/"},
    {"field": "url", "path_prefix": "/mo"},
    {"field": "url", "prefix": "https://www.cars"},
    {"field": "url", "contains": "dealers"},
    {"field": "url", "suffix": "/suv"},
    {"field": "attrs.cart_value", "gte": 100},
    {"field": "attrs.cart_value", "between": [10, 100]},
    {"field": "attrs.cart_value", "lt": 50},
    {"field": "attrs.plan", "equals": "gold"},
    {"field": "attrs.plan", "equals": 1},
    {"field": "attrs.query", "regex": "\\b(ev|electric)\\b"},
    {"field": "attrs.ids", "under_iab": 2},
    {"field": "attrs.ids", "in": ["4", 3]},
]


BROAD = [
    {"field": "type", "equals": "page_view"},
    {"field": "type", "equals": "click"},
    {"field": "categories", "under": "auto"},
    {"field": "url", "host_suffix": "cars.example"},
]


def predicates() -> st.SearchStrategy[Any]:
    leaf = st.sampled_from(FIELD_TESTS)
    return st.one_of(
        leaf,
        leaf,
        st.recursive(
            leaf,
            lambda inner: st.one_of(
                st.builds(lambda ps: {"all": ps}, st.lists(inner, min_size=1, max_size=3)),
                st.builds(lambda ps: {"any": ps}, st.lists(inner, min_size=1, max_size=3)),
                st.builds(lambda p: {"not": p}, inner),
            ),
            max_leaves=4,
        ),
    )


@st.composite
def leaves(draw: st.DrawFn, positive: bool = False) -> dict[str, Any]:
    kinds = ["count", "last", "lapsed", "first", "sum", "average", "sequence", "wscore", "dscore"]
    if not positive:
        kinds.append("at_most")
    kind = draw(st.sampled_from(kinds))
    where = draw(predicates())
    within = draw(st.sampled_from(DURATIONS))
    if kind == "count":
        return {"at_least": draw(st.integers(1, 3)), "within": within, "where": where}
    if kind == "at_most":
        return {"at_most": draw(st.integers(0, 2)), "within": within, "where": where}
    if kind == "last":
        return {"last_seen_within": within, "where": where}
    if kind == "lapsed":
        return {"not_seen_within": within, "seen_within": "10d", "where": where}
    if kind == "first":
        return {"first_seen_within": within, "where": draw(st.sampled_from(BROAD)) or where}
    if kind in ("sum", "average"):
        bound = draw(st.sampled_from([0, 50, 100, 150]))
        leaf: dict[str, Any] = {kind: "attrs.cart_value", "within": within}
        leaf["at_least"] = bound if kind == "average" or bound > 0 else 10
        if draw(st.booleans()):
            leaf["at_most"] = 200
        if draw(st.booleans()):
            leaf["where"] = where
        return leaf
    if kind == "sequence":
        steps = draw(
            st.lists(st.one_of(st.sampled_from(BROAD), predicates()), min_size=2, max_size=3)
        )
        return {
            "sequence": steps,
            "then_within": draw(st.sampled_from(DURATIONS)),
            "within": within,
        }
    entries = draw(
        st.lists(
            st.builds(
                lambda p, w: {"points": p, "where": w}, st.sampled_from([1, 2, 5]), predicates()
            ),
            min_size=1,
            max_size=3,
        )
    )
    score: dict[str, Any] = {"score": entries, "at_least": draw(st.sampled_from([2, 3, 7]))}
    if kind == "wscore":
        score["within"] = within
    else:
        score["half_life"] = within
    return score


def conditions() -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves(),
        lambda inner: st.one_of(
            st.builds(lambda ps: {"all": ps}, st.lists(inner, min_size=1, max_size=2)),
            st.builds(lambda ps: {"any": ps}, st.lists(inner, min_size=1, max_size=2)),
            st.builds(lambda p: {"not": p}, inner),
        ),
        max_leaves=3,
    )


@st.composite
def rule_files(draw: st.DrawFn) -> dict[str, Any]:
    """A rule document whose rules never hold for a cookie without events (else refused)."""
    segments = []
    count = draw(st.integers(1, 5))
    for n in range(count):
        rule = draw(leaves(positive=True))
        if draw(st.booleans()):
            rule = {"all": [rule, draw(conditions())]}
        segment: dict[str, Any] = {"id": f"s{n}", "rule": rule}
        if draw(st.booleans()):
            segment["ttl"] = draw(st.sampled_from(["1h", "1d", "3d"]))
        if draw(st.integers(0, 9)) == 0:
            segment["status"] = "paused"
        segments.append(segment)
    if count >= 2 and draw(st.booleans()):
        segments.append({"id": "combo", "of": {"and": ["s0", {"or": ["s1", {"not": "s0"}]}]}})
    return {"retention": "10d", "segments": segments}


@st.composite
def timed_events(draw: st.DrawFn, now: float) -> list[tuple[float, dict[str, Any]]]:
    """Events up to 12 days before ``now``, in arrival order (not time order)."""
    return draw(
        st.lists(
            st.tuples(
                st.one_of(st.integers(0, 4 * 48), st.integers(0, 12 * 48)).map(
                    lambda k: now - k * STEP
                ),
                events(),
            ),
            max_size=25,
        )
    )
