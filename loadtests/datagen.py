"""Seeded, repeatable synthetic traffic and rules for the load tests.

    python -m loadtests.datagen rules --segments 1000 --out rules.yaml
    python -m loadtests.datagen events --events 1000 [--cookies 10000000]
    python -m loadtests.datagen store --cookies 10000000 --segments 1000 --prefix lt

- Cookies: ``c<rank>``, ``rank`` drawn from a Zipf law (exponent 1) over ``--cookies``
  distinct ids, so a few cookies are very active and most are seen once or twice.
- Sessions: a cookie visits one site for a few events (geometric length, seconds apart);
  each site covers one branch of the IAB Audience Taxonomy 1.1 (the real TSV), and its pages
  carry categories from that branch as ``/``-separated slugs (``interest/automotive/...``).
- Geo: every cookie lives in one US state and metro (10 % abroad).
- Rules: the kinds the language offers (category interest, geo, site + path, cart sums,
  search regexes, lapsed buyers, sequences, decaying scores, segments of segments) plus
  ``lt_probe`` (events carrying ``attrs.probe``), which the freshness test watches.
- Store: the Redis state ingest would have written for such a rule set, written directly in
  the store's layout (``dmp.keys.PartitionKeys``): per partition the ``ids`` array of 8-byte
  big-endian uid hashes, ``bm:{segment}:{chunk}`` pyroaring bitmaps of local positions, the
  partitions set and a change stream, with base-segment populations spread log-uniformly
  from 1K to 5M members. A lookup replica loads it as it loads production state.
"""

from __future__ import annotations

import argparse
import array
import csv
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import redis
import yaml
from pyroaring import BitMap

from dmp.ids import CHUNK_BITS, position, uid_hash
from dmp.keys import PartitionKeys, partitions_key
from loadtests.common import TAXONOMY

ZIPF_S = 1.0
DAY = 86400.0
MIN_POPULATION = 1_000
MAX_POPULATION = 5_000_000
PROBE_SEGMENT = "lt_probe"
FINGERPRINT = "loadtest-fingerprint"

TYPES: tuple[str, ...] = (
    ("page_view",) * 70 + ("click",) * 10 + ("impression",) * 10 + ("search",) * 5
)
TYPES += ("conversion",) * 3 + ("video_view",) * 2
_STATES = (
    "AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ"
)
STATES = [
    *_STATES.split(),
    *[
        "NM",
        "NY",
        "NC",
        "ND",
        "OH",
        "OK",
        "OR",
        "PA",
        "RI",
        "SC",
        "SD",
        "TN",
        "TX",
        "UT",
        "VT",
        "VA",
        "WA",
        "WV",
        "WI",
        "WY",
    ],
]
# Google metro (DMA) codes: 210 of them, 500 to 881.
METROS = tuple(str(code) for code in range(500, 882, 2))[:210]
PATHS = ("/", "/models/", "/dealers/", "/reviews/", "/deals/", "/guides/", "/search")
QUERIES = ("electric suv", "cheap flights", "ev charger", "running shoes", "mortgage rates")
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


def zipf_ranks(rng: np.random.Generator, n: int, size: int, s: float = ZIPF_S) -> I64:
    """``size`` ranks in ``[0, n)``; rank ``r`` has probability about ``(r + 1) ** -s``.

    The inverse of the continuous power law's distribution function, so the wrk Lua script
    (loadtests/zipf.lua) draws from exactly the same law.
    """
    u = rng.random(size)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        a = 1.0 - s
        x = (((n + 1.0) ** a - 1.0) * u + 1.0) ** (1.0 / a)
    ranks: I64 = np.minimum(x.astype(np.int64) - 1, n - 1)
    return ranks


def cookie_id(rank: int) -> str:
    return f"c{rank}"


# -- the world: taxonomy, sites, geo --------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Category:
    iab_id: int
    path: str  # interest/automotive/auto-body-styles


def load_categories(path: Path = TAXONOMY) -> list[Category]:
    """Interest and purchase-intent nodes of the IAB Audience Taxonomy 1.1, as slug paths."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: the IAB Audience Taxonomy 1.1 TSV (see --taxonomy)")
    out = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if len(row) < 10 or not row[1].strip().isdigit():
                continue
            tiers = [t.strip() for t in row[4:10] if t.strip()]
            if tiers and tiers[0] in ("Interest", "Purchase Intent*"):
                out.append(Category(int(row[1]), "/".join(_slug(t) for t in tiers)))
    return out


@dataclass(frozen=True)
class Site:
    host: str
    categories: tuple[str, ...]  # the branch of the taxonomy its pages are about


@dataclass
class World:
    """The vocabulary both the rules and the events draw from; all of it from ``seed``."""

    seed: int = 7
    taxonomy: Path = TAXONOMY
    sites_count: int = 300
    categories: list[Category] = field(init=False)
    sites: list[Site] = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.categories = load_categories(self.taxonomy)
        paths = [c.path for c in self.categories]
        # Branches: taxonomy nodes with at least 3 descendants; each site covers one.
        branches = [p for p in paths if sum(q.startswith(p + "/") for q in paths) >= 3]
        self.sites = []
        for n in range(self.sites_count):
            root = branches[int(rng.integers(len(branches)))]
            under = tuple(q for q in paths if q == root or q.startswith(root + "/"))
            self.sites.append(Site(f"site{n}.example", under))

    def geo(self, rank: int) -> dict[str, str]:
        # A fixed home per cookie, spread by a multiplicative hash of its rank.
        h = (rank * 2654435761) & 0xFFFFFFFF
        if h % 10 == 0:
            return {"country": ("CAN", "GBR", "DEU", "FRA")[h % 4], "region": "XX"}
        return {
            "country": "USA",
            "region": STATES[h % len(STATES)],
            "metro": METROS[(h >> 8) % len(METROS)],
            "zip": f"{(h >> 4) % 100000:05d}",
        }


# -- events -----------------------------------------------------------------------------
def events(
    world: World,
    count: int,
    *,
    cookies: int,
    seed: int,
    now: float,
    days: float = 7.0,
) -> Iterator[dict[str, Any]]:
    """``count`` events in sessions; event times within the last ``days`` before ``now``."""
    rng = np.random.default_rng(seed)
    emitted = 0
    batch = 4096
    while emitted < count:
        ranks = zipf_ranks(rng, cookies, batch)
        sites = zipf_ranks(rng, len(world.sites), batch, s=1.1)
        lengths = rng.geometric(0.3, batch)
        starts = now - rng.random(batch) * days * DAY
        for rank, site_n, length, start in zip(ranks, sites, lengths, starts, strict=True):
            site = world.sites[int(site_n)]
            geo = world.geo(int(rank))
            uid = cookie_id(int(rank))
            device = ("mobile", "desktop", "tablet")[int(rank) % 3]
            ts = float(start)
            for _ in range(int(length)):
                yield _event(rng, uid, ts, site, geo, device)
                emitted += 1
                if emitted >= count:
                    return
                ts = min(now, ts + float(rng.exponential(40.0)))


def _event(
    rng: np.random.Generator,
    uid: str,
    ts: float,
    site: Site,
    geo: dict[str, str],
    device: str,
) -> dict[str, Any]:
    kind = TYPES[int(rng.integers(len(TYPES)))]
    host = site.host if rng.random() < 0.6 else f"www.{site.host}"
    path = PATHS[int(rng.integers(len(PATHS)))]
    cats = site.categories
    picked = {cats[int(i)] for i in zipf_ranks(rng, len(cats), int(rng.integers(1, 4)), s=0.8)}
    event: dict[str, Any] = {
        "uid": uid,
        "ts": round(ts, 3),
        "type": kind,
        "url": f"https://{host}{path}item-{int(rng.integers(1000))}",
        "categories": sorted(picked),
        "geo": geo,
        "attrs": {"device": device},
    }
    if kind == "conversion":
        event["attrs"]["cart_value"] = round(float(rng.uniform(5, 900)), 2)
    if kind == "search":
        event["attrs"]["query"] = QUERIES[int(rng.integers(len(QUERIES)))]
    return event


def probe_event(uid: str, ts: float) -> dict[str, Any]:
    """An event that puts a never-seen cookie into ``lt_probe`` and nothing else."""
    return {"uid": uid, "ts": ts, "type": "impression", "attrs": {"probe": 1}}


# -- rules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleSet:
    text: str
    segment_ids: tuple[str, ...]
    base_ids: tuple[str, ...]  # segments with a rule (bitmaps); the others are composites
    kinds: dict[str, int]


def rule_set(world: World, segments: int, seed: int | None = None) -> RuleSet:
    """``segments`` segments of every kind, about 5 % of them composites, one ``lt_probe``."""
    rng = np.random.default_rng(world.seed if seed is None else seed)
    docs: list[dict[str, Any]] = [
        {
            "id": PROBE_SEGMENT,
            "owner": "loadtests",
            "rule": {"within": "1d", "where": {"field": "attrs.probe", "exists": True}},
        }
    ]
    kinds: dict[str, int] = {"probe": 1}
    for n in range(1, segments):
        kind, doc = _segment(world, rng, n)
        docs.append(doc)
        kinds[kind] = kinds.get(kind, 0) + 1
    text = yaml.safe_dump({"version": 1, "segments": docs}, sort_keys=False)
    base = tuple(d["id"] for d in docs if "rule" in d)
    return RuleSet(text, tuple(d["id"] for d in docs), base, kinds)


def _segment(world: World, rng: np.random.Generator, n: int) -> tuple[str, dict[str, Any]]:
    seg: dict[str, Any] = {"id": f"seg_{n:04d}", "owner": "loadtests"}
    pick = rng.random()
    cats = world.categories
    site = world.sites[int(rng.integers(len(world.sites)))]
    if n > 2 and pick < 0.05:
        a, b, c = (f"seg_{int(x):04d}" for x in rng.choice(np.arange(1, n), 3, replace=n < 4))
        if rng.random() < 0.5:
            seg["of"] = {"and": [a, {"or": [b, c]}]}
        else:
            seg["of"] = {"and": [a, {"not": b}]} if a != b else {"or": [a, c]}
        return "composite", seg
    if pick < 0.50:
        cat = cats[int(rng.integers(len(cats)))]
        seg["iab_ids"] = [cat.iab_id]
        seg["rule"] = {
            "at_least": int(rng.integers(1, 4)),
            "within": ("7d", "14d", "30d")[int(rng.integers(3))],
            "where": {
                "all": [
                    {"field": "type", "equals": "page_view"},
                    {"field": "categories", "under": cat.path},
                ]
            },
        }
        return "interest", seg
    if pick < 0.65:
        geo: dict[str, Any] = (
            {"field": "geo.metro", "in": [METROS[int(i)] for i in rng.choice(len(METROS), 3)]}
            if rng.random() < 0.5
            else {"field": "geo.region", "equals": STATES[int(rng.integers(len(STATES)))]}
        )
        seg["rule"] = {
            "within": "30d",
            "where": {"all": [{"field": "geo.country", "equals": "USA"}, geo]},
        }
        return "geo", seg
    if pick < 0.75:
        seg["rule"] = {
            "at_least": 2,
            "within": "14d",
            "where": {
                "all": [
                    {"field": "url", "host_suffix": site.host},
                    {"field": "url", "path_prefix": PATHS[1 + int(rng.integers(len(PATHS) - 1))]},
                ]
            },
        }
        return "site", seg
    if pick < 0.82:
        seg["rule"] = {
            "sum": "attrs.cart_value",
            "at_least": (200, 500, 1000)[int(rng.integers(3))],
            "within": "30d",
            "where": {
                "all": [
                    {"field": "type", "equals": "conversion"},
                    {"field": "url", "host_suffix": site.host},
                ]
            },
        }
        return "cart_sum", seg
    if pick < 0.86:
        seg["rule"] = {
            "within": "14d",
            "where": {
                "all": [
                    {"field": "type", "equals": "search"},
                    {"field": "attrs.query", "regex": ("\\bev\\b", "electric", "^cheap")[n % 3]},
                    {"field": "geo.region", "in": [STATES[int(i)] for i in rng.choice(50, 5)]},
                ]
            },
        }
        return "search_regex", seg
    if pick < 0.90:
        seg["rule"] = {
            "not_seen_within": "3d",
            "seen_within": "30d",
            "where": {
                "all": [
                    {"field": "type", "equals": "conversion"},
                    {"field": "url", "host_suffix": site.host},
                ]
            },
        }
        return "lapsed", seg
    if pick < 0.95:
        seg["ttl"] = "14d"
        seg["rule"] = {
            "sequence": [
                {"all": [{"field": "url", "host_suffix": site.host}, _path("/models/")]},
                {"all": [{"field": "url", "host_suffix": site.host}, _path("/dealers/")]},
            ],
            "then_within": "2d",
            "within": "14d",
        }
        return "sequence", seg
    branch = site.categories[0]
    seg["rule"] = {
        "score": [
            {"points": 1, "where": {"all": [_type("page_view"), _under(branch)]}},
            {"points": 5, "where": {"all": [_type("click"), _under(branch)]}},
        ],
        "at_least": 10,
        "half_life": "7d",
    }
    return "decaying_score", seg


def _path(prefix: str) -> dict[str, str]:
    return {"field": "url", "path_prefix": prefix}


def _type(kind: str) -> dict[str, str]:
    return {"field": "type", "equals": kind}


def _under(category: str) -> dict[str, str]:
    return {"field": "categories", "under": category}


def populations(base_ids: Sequence[str], cookies: int, seed: int) -> dict[str, int]:
    """Members per base segment, log-uniform from 1K to 5M (capped at half the cookies)."""
    rng = np.random.default_rng(seed + 1)
    high = min(MAX_POPULATION, max(MIN_POPULATION + 1, cookies // 2))
    low = min(MIN_POPULATION, high - 1)
    sizes = np.exp(rng.uniform(np.log(low), np.log(high), len(base_ids)))
    return {s: int(n) for s, n in zip(base_ids, sizes, strict=True)}


# -- the store, written directly ---------------------------------------------------------
@dataclass(frozen=True)
class StoreSpec:
    prefix: str
    topic: str
    partitions: int
    cookies: int
    segments: int
    seed: int

    @property
    def fingerprint(self) -> str:
        return (
            f"v1 cookies={self.cookies} segments={self.segments} partitions={self.partitions} "
            f"seed={self.seed} topic={self.topic}"
        )


@dataclass
class StoreReport:
    spec: StoreSpec
    memberships: int = 0
    populations: dict[str, int] = field(default_factory=dict)
    bitmap_keys: int = 0
    bitmap_bytes: int = 0
    ids_bytes: int = 0
    seconds: float = 0.0
    reused: bool = False


def uid_hashes(first: int, stop: int, step: int) -> U64:
    """uid hashes of cookies ``c<first>``, ``c<first + step>``, ... below ``stop``."""
    return np.fromiter(
        (uid_hash(cookie_id(n)) for n in range(first, stop, step)),
        dtype=np.uint64,
        count=len(range(first, stop, step)),
    )


def _members(rng: np.random.Generator, cookies: int, k: int) -> I64:
    """About ``k`` distinct cookie numbers, sorted."""
    if k * 8 < cookies:
        return np.unique(rng.integers(0, cookies, size=k))
    return np.flatnonzero(rng.random(cookies) < k / cookies).astype(np.int64)


def write_store(
    client: redis.Redis,
    spec: StoreSpec,
    rules: RuleSet,
    *,
    force: bool = False,
    sizes: dict[str, int] | None = None,
) -> StoreReport:
    """Write the state for ``rules`` (its base segments) and ``spec.cookies`` cookies.

    Cookie ``n`` lives in partition ``n % partitions`` at local position
    ``n // partitions``. ``sizes`` (default: ``populations``) gives each base segment's
    members; segments it leaves out get none. Skipped when the same spec was written before
    (a fingerprint key), unless ``force``.
    """
    report = StoreReport(spec)
    started = time.perf_counter()
    marker = f"{spec.prefix}:{FINGERPRINT}"
    if sizes is None:
        sizes = populations(rules.base_ids, spec.cookies, spec.seed)
    if not force and client.get(marker) == spec.fingerprint.encode():
        report.reused = True
        raw = client.get(f"{marker}:report")
        if raw:
            saved = orjson.loads(raw)
            report.memberships = saved["memberships"]
            report.populations = saved["populations"]
        return report
    delete_prefix(client, spec.prefix)
    keys = [PartitionKeys(spec.prefix, spec.topic, p) for p in range(spec.partitions)]
    for p, k in enumerate(keys):
        hashes = uid_hashes(p, spec.cookies, spec.partitions)
        raw_ids = hashes.astype(">u8").tobytes()
        client.set(k.ids, raw_ids)
        client.set(k.next_local, len(hashes))
        report.ids_bytes += len(raw_ids)
    rng = np.random.default_rng(spec.seed + 2)
    for segment_id in rules.base_ids:
        if not sizes.get(segment_id):
            continue
        chosen = _members(rng, spec.cookies, sizes[segment_id])
        report.populations[segment_id] = len(chosen)
        report.memberships += len(chosen)
        pipe = client.pipeline(transaction=False)
        for p, k in enumerate(keys):
            locals_ = (chosen[chosen % spec.partitions == p] // spec.partitions).astype(np.uint32)
            chunks = locals_ >> np.uint32(CHUNK_BITS)
            bounds = np.flatnonzero(np.diff(chunks)) + 1
            for part in np.split(locals_, bounds):
                if not len(part):
                    continue
                bitmap = BitMap(array.array("I", part.tobytes()))
                blob = bitmap.serialize()
                pipe.set(k.bitmap(segment_id, int(part[0]) >> CHUNK_BITS), blob)
                report.bitmap_keys += 1
                report.bitmap_bytes += len(blob)
        pipe.execute()
    now = time.time()
    entry = orjson.dumps({"a": {}, "r": {}, "n": [], "u": [], "t": now, "w": now})
    for k in keys:
        client.xadd(k.changes, {"d": entry})
        client.sadd(partitions_key(spec.prefix, spec.topic), str(k.partition))
    report.seconds = time.perf_counter() - started
    client.set(
        f"{marker}:report",
        orjson.dumps({"memberships": report.memberships, "populations": report.populations}),
    )
    client.set(marker, spec.fingerprint)
    return report


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            deleted += int(client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


def positions_of(cookie_numbers: Sequence[int], partitions: int) -> list[int]:
    """Bitmap positions of cookies ``c<n>`` in a store written by ``write_store``."""
    return [position(n % partitions, n // partitions) for n in cookie_numbers]


# -- command line -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--taxonomy", type=Path, default=TAXONOMY)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rules", help="write a rule file")
    p.add_argument("--segments", type=int, default=1000)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("events", help="print events, one JSON object a line")
    p.add_argument("--events", type=int, default=20)
    p.add_argument("--cookies", type=int, default=10_000_000)
    p = sub.add_parser("store", help="write the lookup test's Redis state directly")
    p.add_argument("--cookies", type=int, default=10_000_000)
    p.add_argument("--segments", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--prefix", default="lt")
    p.add_argument("--topic", default="dmp.events")
    p.add_argument("--rules-out", type=Path, required=True)
    p.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    world = World(seed=args.seed, taxonomy=args.taxonomy)
    if args.command == "rules":
        rules = rule_set(world, args.segments)
        args.out.write_text(rules.text)
        print(f"{args.out}: {len(rules.segment_ids)} segments {rules.kinds}")
    elif args.command == "events":
        for event in events(
            world, args.events, cookies=args.cookies, seed=args.seed, now=time.time()
        ):
            print(orjson.dumps(event).decode())
    else:
        from loadtests.common import stack_urls

        rules = rule_set(world, args.segments)
        args.rules_out.write_text(rules.text)
        spec = StoreSpec(
            args.prefix, args.topic, args.partitions, args.cookies, args.segments, args.seed
        )
        client = redis.Redis.from_url(stack_urls()[0])
        report = write_store(client, spec, rules, force=args.force)
        print(
            f"{'reused' if report.reused else 'wrote'} {report.memberships:,} memberships "
            f"in {report.seconds:.1f}s ({report.bitmap_keys:,} bitmap keys)"
        )


if __name__ == "__main__":
    main()
