"""Rule evaluation speed: events/s on one core against decoding the same events alone.

    python -m loadtests.rule_eval [--events 50000] [--segments 10 100 1000] [--runs 3]

For each rule-set size, a realistic rule file is generated (interest categories, geo,
sites and paths, purchases and cart sums, searches with regexes, lapsed users, sequences,
scores, segments of segments), and the same JSON events are timed three ways, each the
median of ``--runs`` runs, side by side in one process:

- decode: ``orjson.loads`` alone (the floor every consumer pays);
- decode + match: ``matching_traits`` (the compiled, indexed rule program that ingest
  runs), the issue's measure; its ratio to decode is the target (at least 0.5 with 1,000
  segments). The program remembers answers per projection of an event onto the fields its
  tests read (segment_rules.event_memo), so each run compiles the rules afresh and first
  matches as many *other* events from the same generator (a process in steady state has
  seen traffic before, but never these very events);
- decode + match, cold: the same with nothing matched before (a process just started);
- decode + match, Python: the generated Python matcher alone, warm, without the compiled
  one in front of it (segment_rules/fast_match.py; what every run measured before it);
- decode + match + record: also updating a per-cookie history, as ingest does before it
  evaluates each touched cookie once per batch;
- decode + scan: every compiled test run on every event, no index (what the index saves).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
import yaml

from segment_rules import CompiledRules, History, RuleSet, parse_rules
from segment_rules.event_index import EventIndex
from segment_rules.event_tests import Event, compile_predicate

TYPES = ["page_view"] * 70 + ["click"] * 10 + ["impression"] * 10 + ["search"] * 5
TYPES += ["conversion"] * 3 + ["video_view"] * 2
TOPICS = [
    "auto",
    "travel",
    "finance",
    "sports",
    "news",
    "tech",
    "food",
    "health",
    "home",
    "fashion",
    "entertainment",
    "education",
]
NOW = 1_800_000_000.0


def category_tree(rng: random.Random) -> list[str]:
    paths = []
    for topic in TOPICS:
        paths.append(topic)
        for a in range(5):
            child = f"{topic}/sub{a}"
            paths.append(child)
            paths.extend(f"{child}/leaf{b}" for b in range(4))
    rng.shuffle(paths)
    return paths


class World:
    """The vocabulary both the rules and the events draw from."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.categories = category_tree(rng)
        self.regions = [f"R{n:02d}" for n in range(50)]
        self.metros = [str(500 + n) for n in range(210)]
        self.sites = [f"site{n}.example" for n in range(200)]
        self.paths = ["/", "/models/", "/dealers/", "/new/", "/reviews/", "/deals/", "/search"]

    def zipf(self, items: list[str]) -> str:
        # A few popular values and a long tail, as real traffic has.
        index = min(int(self.rng.paretovariate(1.2)) - 1, len(items) - 1)
        return items[index]

    def event(self, uid: int, ts: float) -> dict[str, Any]:
        rng = self.rng
        kind = rng.choice(TYPES)
        site = self.zipf(self.sites)
        host = site if rng.random() < 0.6 else f"www.{site}"
        event: dict[str, Any] = {
            "uid": f"c-{uid}",
            "ts": ts,
            "type": kind,
            "url": f"https://{host}{rng.choice(self.paths)}item-{rng.randrange(1000)}",
            "categories": [self.zipf(self.categories) for _ in range(rng.randint(1, 3))],
            "geo": {
                "country": "USA" if rng.random() < 0.8 else rng.choice(["CAN", "GBR", "DEU"]),
                "region": rng.choice(self.regions),
                "metro": rng.choice(self.metros),
                "zip": f"{rng.randrange(100000):05d}",
            },
            "attrs": {"device": rng.choice(["mobile", "desktop", "tablet"])},
        }
        if kind == "conversion":
            event["attrs"]["cart_value"] = round(rng.uniform(5, 900), 2)
        if kind == "search":
            event["attrs"]["query"] = rng.choice(["electric suv", "cheap flights", "ev charger"])
        return event

    def segment(self, n: int) -> dict[str, Any]:
        rng = self.rng
        pick = rng.random()
        seg: dict[str, Any] = {"id": f"seg_{n}", "owner": "bench"}
        if n > 20 and pick < 0.05:
            a, b = rng.sample(range(n - 1), 2)
            seg["of"] = {"and": [f"seg_{a}", {"or": [f"seg_{b}", f"seg_{a + 1}"]}]}
            return seg
        if pick < 0.45:
            seg["rule"] = {
                "at_least": rng.randint(1, 3),
                "within": rng.choice(["7d", "14d", "30d"]),
                "where": {
                    "all": [
                        {"field": "type", "equals": "page_view"},
                        {"field": "categories", "under": rng.choice(self.categories)},
                    ]
                },
            }
        elif pick < 0.60:
            geo = (
                {"field": "geo.metro", "in": rng.sample(self.metros, 3)}
                if rng.random() < 0.5
                else {"field": "geo.region", "equals": rng.choice(self.regions)}
            )
            seg["rule"] = {
                "within": "30d",
                "where": {"all": [{"field": "geo.country", "equals": "USA"}, geo]},
            }
        elif pick < 0.70:
            seg["rule"] = {
                "at_least": 2,
                "within": "14d",
                "where": {
                    "all": [
                        {"field": "url", "host_suffix": rng.choice(self.sites)},
                        {"field": "url", "path_prefix": rng.choice(self.paths[1:])},
                    ]
                },
            }
        elif pick < 0.78:
            seg["rule"] = {
                "sum": "attrs.cart_value",
                "at_least": rng.choice([200, 500, 1000]),
                "within": "30d",
                "where": {
                    "all": [
                        {"field": "type", "equals": "conversion"},
                        {"field": "categories", "under": rng.choice(TOPICS)},
                    ]
                },
            }
        elif pick < 0.83:
            seg["rule"] = {
                "within": "14d",
                "where": {
                    "all": [
                        {"field": "type", "equals": "search"},
                        {
                            "field": "attrs.query",
                            "regex": rng.choice(["\\bev\\b", "electric", "^cheap"]),
                        },
                        {"field": "geo.region", "in": rng.sample(self.regions, 5)},
                    ]
                },
            }
        elif pick < 0.88:
            seg["rule"] = {
                "not_seen_within": "30d",
                "seen_within": "90d",
                "where": {
                    "all": [
                        {"field": "type", "equals": "conversion"},
                        {"field": "url", "host_suffix": rng.choice(self.sites)},
                    ]
                },
            }
        elif pick < 0.94:
            site = rng.choice(self.sites)
            seg["ttl"] = "14d"
            seg["rule"] = {
                "sequence": [
                    {
                        "all": [
                            {"field": "url", "host_suffix": site},
                            {"field": "url", "path_prefix": "/models/"},
                        ]
                    },
                    {
                        "all": [
                            {"field": "url", "host_suffix": site},
                            {"field": "url", "path_prefix": "/dealers/"},
                        ]
                    },
                ],
                "then_within": "2d",
                "within": "14d",
            }
        else:
            topic = rng.choice(TOPICS)
            seg["rule"] = {
                "score": [
                    {
                        "points": 1,
                        "where": {
                            "all": [
                                {"field": "type", "equals": "page_view"},
                                {"field": "categories", "under": topic},
                            ]
                        },
                    },
                    {
                        "points": 5,
                        "where": {
                            "all": [
                                {"field": "type", "equals": "click"},
                                {"field": "categories", "under": topic},
                            ]
                        },
                    },
                ],
                "at_least": 10,
                "half_life": "7d",
            }
        return seg


def rule_text(world: World, segments: int) -> str:
    return yaml.safe_dump({"segments": [world.segment(n) for n in range(segments)]})


def _timed(loop: Callable[[], None]) -> float:
    start = time.perf_counter()
    loop()
    return time.perf_counter() - start


def measure(ruleset: RuleSet, raws: list[bytes], warm: list[bytes], runs: int) -> dict[str, float]:
    loads = orjson.loads

    def fresh(warmed: bool) -> CompiledRules:
        rules = CompiledRules(ruleset)
        if warmed:
            for raw in warm:
                rules.matching_traits(loads(raw))
        return rules

    def python_only() -> Callable[[Event], tuple[str, ...]]:
        match = EventIndex(CompiledRules(ruleset).tests, accelerate=False).match
        for raw in warm:
            match(loads(raw))
        return match

    def decode_match(
        rules: CompiledRules | Callable[[Event], tuple[str, ...]],
    ) -> Callable[[], None]:
        match = rules.matching_traits if isinstance(rules, CompiledRules) else rules

        def loop() -> None:
            for raw in raws:
                match(loads(raw))

        return loop

    def decode_match_record(rules: CompiledRules) -> Callable[[], None]:
        match, record = rules.matching_traits, rules.record

        def loop() -> None:
            histories: dict[str, History] = {}
            for raw in raws:
                event = loads(raw)
                history = histories.setdefault(event["uid"], {})
                record(history, event["ts"], match(event), NOW, event)

        return loop

    def decode() -> None:
        for raw in raws:
            loads(raw)

    every = [(tid, compile_predicate(pred)) for tid, pred in fresh(False).tests.items()]

    def decode_scan() -> None:
        for raw in raws:
            event = loads(raw)
            [tid for tid, test in every if test(event)]

    kinds = ("decode", "match", "cold", "python", "record", "scan")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(runs):  # interleaved, so drift hits all alike
        times["decode"].append(_timed(decode))
        times["match"].append(_timed(decode_match(fresh(True))))
        times["cold"].append(_timed(decode_match(fresh(False))))
        times["python"].append(_timed(decode_match(python_only())))
        times["record"].append(_timed(decode_match_record(fresh(True))))
        times["scan"].append(_timed(decode_scan))
    return {k: len(raws) / statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--segments", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    world = World(random.Random(args.seed))
    raws = [
        orjson.dumps(
            world.event(world.rng.randrange(args.events // 5), NOW - world.rng.uniform(0, 86400))
        )
        for _ in range(args.events)
    ]
    # The same vocabulary and popularity, other draws (and the rules and the measured events
    # stay those of a run without warm-up).
    other = World(random.Random(args.seed))
    other.rng = random.Random(args.seed + 1)
    warm = [
        orjson.dumps(
            other.event(other.rng.randrange(args.events // 5), NOW - other.rng.uniform(0, 86400))
        )
        for _ in range(args.events)
    ]
    print(f"{args.events} events, {sum(map(len, raws)) / len(raws):.0f} bytes each on average")
    print(
        f"{'segments':>8} {'tests':>6} {'decode/s':>10} {'+match/s':>10} {'ratio':>6} "
        f"{'cold/s':>10} {'ratio':>6} {'python/s':>10} {'ratio':>6} "
        f"{'+record/s':>10} {'ratio':>6} {'+scan/s':>10} "
        f"{'matches/ev':>10}"
    )
    for count in args.segments:
        ruleset = parse_rules(rule_text(world, count), f"bench-{count}.yaml")
        rules = CompiledRules(ruleset)
        hits = sum(len(rules.matching_traits(orjson.loads(r))) for r in raws[:5000]) / 5000
        rate = measure(ruleset, raws, warm, args.runs)
        print(
            f"{count:>8} {len(rules.tests):>6} {rate['decode']:>10,.0f} {rate['match']:>10,.0f} "
            f"{rate['match'] / rate['decode']:>6.2f} {rate['cold']:>10,.0f} "
            f"{rate['cold'] / rate['decode']:>6.2f} {rate['python']:>10,.0f} "
            f"{rate['python'] / rate['decode']:>6.2f} {rate['record']:>10,.0f} "
            f"{rate['record'] / rate['decode']:>6.2f} {rate['scan']:>10,.0f} {hits:>10.2f}"
        )


if __name__ == "__main__":
    main()
