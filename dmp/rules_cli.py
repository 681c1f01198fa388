"""``dmp rules ...``: the ad-ops commands that work against the store."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from dmp.audience import Audience
from dmp.backfill import CHUNK_EVENTS, Backfill, Report
from dmp.backfill_abandon import abandon
from dmp.backfill_job import BackfillError
from dmp.backfill_status import going_live, unfinished_backfills
from dmp.config import Settings
from dmp.redis_client import connect
from dmp.rule_tests import load_cases, run_case
from dmp.rule_versions import RuleVersions, describe_ruleset, diff_rules
from segment_rules import (
    CompiledRules,
    RuleFileError,
    RuleSet,
    explain,
    load_rules_file,
    parse_rules,
)

Command = Callable[[argparse.Namespace, Settings], int]


def add_rules_commands(rules_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = rules_sub.add_parser("apply", help="validate a file and make it the live version")
    p.add_argument("file")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(func=_sync(_apply))
    p = rules_sub.add_parser("versions", help="list applied versions (* = live)")
    p.set_defaults(func=_sync(_versions))
    p = rules_sub.add_parser("diff", help="what a file would change against the live version")
    p.add_argument("file")
    p.set_defaults(func=_sync(_diff))
    p = rules_sub.add_parser("rollback", help="make an earlier version live again")
    p.add_argument("--to", type=int, help="version number (default: the one before the live one)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(func=_sync(_rollback))
    p = rules_sub.add_parser("test", help="run ad-ops rule test cases (YAML); exit 1 on a failure")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_test)
    p = rules_sub.add_parser("explain", help="a rule in plain English")
    p.add_argument("segment")
    p.set_defaults(func=_explain)
    p = rules_sub.add_parser("estimate", help="a segment's population now, from the store")
    p.add_argument("segment")
    p.set_defaults(func=_sync(_estimate))
    p = rules_sub.add_parser("overlap", help="pairwise overlap counts and percentages")
    p.add_argument("segments", nargs="+")
    p.set_defaults(func=_sync(_overlap))
    p = rules_sub.add_parser("sample", help="a few member cookie ids, for debugging")
    p.add_argument("segment")
    p.add_argument("count", type=int, nargs="?", default=10)
    p.set_defaults(func=_sync(_sample))
    p = rules_sub.add_parser(
        "backfill", help="build a paused segment from the history in Kafka, then make it live"
    )
    p.add_argument("segment")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--days", type=float, help="history to read, in days")
    what.add_argument(
        "--abandon",
        action="store_true",
        help="drop the segment's unfinished backfill (stages and bookkeeping; what merged "
        "stays, the segment stays paused) so that apply takes it and a backfill starts over",
    )
    p.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for ingest to take the version"
    )
    p.add_argument(
        "--merge-timeout", type=float, default=600.0, help="seconds to wait for ingest to merge"
    )
    p.add_argument(
        "--chunk-events",
        type=_positive,
        default=CHUNK_EVENTS,
        help="history events per merge transaction (each holds up its partition's ingest "
        f"about as long as a batch of that many events; default {CHUNK_EVENTS:,})",
    )
    p.set_defaults(func=_backfill)


_FORCE_HELP = "make segments live even while a backfill of theirs is only partly merged"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would say "invalid _positive value"
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _sync(
    command: Callable[[argparse.Namespace, Settings, aioredis.Redis], Awaitable[int]],
) -> Command:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        async def main() -> int:
            client = connect(settings.redis)
            try:
                return await command(args, settings, client)
            finally:
                await client.aclose()

        try:
            return asyncio.run(main())
        except RuleFileError as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            return 1
        except (KeyError, LookupError) as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 1

    return run


async def _live_rules(settings: Settings, client: aioredis.Redis) -> CompiledRules:
    """The live version if one was applied, else the configured file."""
    active = await RuleVersions(client, settings.redis.key_prefix).active()
    if active is not None:
        return CompiledRules(parse_rules(active.text, f"rules v{active.number}"))
    return CompiledRules(load_rules_file(settings.rules_path))


async def _half_backfilled(
    settings: Settings, client: aioredis.Redis, live_text: str, ruleset: RuleSet
) -> str | None:
    """Why applying ``ruleset`` over ``live_text`` would put a half-merged segment live."""
    before = parse_rules(live_text, "the live version").segments
    live = going_live(
        ((s.id, s.status) for s in before), ((s.id, s.status) for s in ruleset.segments)
    )
    if not live:
        return None
    unfinished = await unfinished_backfills(client, settings.redis.key_prefix, settings.kafka.topic)
    blocked = [u for u in unfinished if u.segment in live]
    if not blocked:
        return None
    lines = [
        f"error: '{u.segment}' would go live half backfilled: {u.describe()}." for u in blocked
    ]
    commands = " and ".join(f"`{u.rerun}`" for u in blocked)
    abandons = " and ".join(f"`dmp rules backfill {u.segment} --abandon`" for u in blocked)
    lines.append(
        "Lookups and partners would get part of its audience, then the rest as it merges. "
        f"Run {commands} again (it finishes the merge, then makes the segment live), "
        f"or {abandons} to drop the job (a stage its partition refused cannot finish) and "
        "start over. Nothing was changed; --force makes it live as it is."
    )
    return "\n".join(lines)


async def _apply(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    text = await asyncio.to_thread(Path(args.file).read_text, encoding="utf-8")
    versions = RuleVersions(client, settings.redis.key_prefix)
    active = await versions.active()
    changes = diff_rules(active.text, text) if active else ["+ (first version)"]
    ruleset = parse_rules(text, args.file)  # refuse an invalid file before anything else
    if active is not None and not args.force:
        refusal = await _half_backfilled(settings, client, active.text, ruleset)
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 1
    version = await versions.apply(text, args.file)
    print(f"applied {args.file} as version {version.number} ({describe_ruleset(ruleset)})")
    for line in changes:
        print(f"  {line}")
    return 0


async def _versions(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    versions = RuleVersions(client, settings.redis.key_prefix)
    live = await versions.active_number()
    for v in await versions.list():
        mark = "*" if v.number == live else " "
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.applied_at))
        print(f"{mark} {v.number:>4}  {when}Z  {v.sha256[:12]}  {v.source}")
    return 0


async def _diff(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    text = await asyncio.to_thread(Path(args.file).read_text, encoding="utf-8")
    parse_rules(text, args.file)  # refuse to diff an invalid file: say why instead
    active = await RuleVersions(client, settings.redis.key_prefix).active()
    base = (
        active.text
        if active
        else await asyncio.to_thread(settings.rules_path.read_text, encoding="utf-8")
    )
    lines = diff_rules(base, text)
    for line in lines or ["no changes"]:
        print(line)
    return 0


async def _rollback(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    versions = RuleVersions(client, settings.redis.key_prefix)
    active, target = await versions.rollback_target(args.to)
    if not args.force:
        ruleset = parse_rules(target.text, f"rules v{target.number}")
        refusal = await _half_backfilled(settings, client, active.text, ruleset)
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 1
    # The version checked above, not ``rollback(args.to)``: with no --to, that picks "the
    # one before the live one" again, which another apply in between would have moved.
    version = await versions.reapply(target)
    print(f"version {version.number} is live: {version.source}")
    return 0


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    ruleset = load_rules_file(settings.rules_path)
    try:
        print(explain(ruleset.segment(args.segment)))
    except KeyError:
        print(f"error: unknown segment '{args.segment}' in {settings.rules_path}", file=sys.stderr)
        return 1
    return 0


def _audience(settings: Settings, client: aioredis.Redis, rules: CompiledRules) -> Audience:
    return Audience(client, settings.redis.key_prefix, settings.kafka.topic, rules)


async def _estimate(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    audience = _audience(settings, client, await _live_rules(settings, client))
    members = await audience.estimate(args.segment)
    status = audience.status(args.segment)
    # A paused segment is built but hidden from lookups: say so next to the figure.
    note = " (paused: built, not answered by lookups)" if status == "paused" else ""
    print(f"{args.segment}: {members} cookies{note}")
    return 0


async def _overlap(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    audience = _audience(settings, client, await _live_rules(settings, client))
    print(f"{'A':<28} {'B':<28} {'both':>10} {'% of A':>7} {'% of B':>7}")
    for o in await audience.overlap(args.segments):
        print(f"{o.a:<28} {o.b:<28} {o.both:>10} {o.percent_of_a:>6.1f}% {o.percent_of_b:>6.1f}%")
    paused = [s for s in dict.fromkeys(args.segments) if audience.status(s) == "paused"]
    if paused:
        print(f"paused (built, not answered by lookups): {', '.join(paused)}")
    return 0


async def _sample(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    audience = _audience(settings, client, await _live_rules(settings, client))
    for uid in await audience.sample(args.segment, args.count):
        print(uid)
    return 0


async def _abandon(args: argparse.Namespace, settings: Settings, client: aioredis.Redis) -> int:
    prefix, topic = settings.redis.key_prefix, settings.kafka.topic
    jobs, removed = await abandon(client, prefix, topic, args.segment)
    if not jobs:
        print(f"{args.segment}: no unfinished backfill: nothing to abandon")
        return 0
    for job in jobs:
        print(f"abandoning {job.describe()}")
    for partition in removed:
        print(f"  {partition.describe()}")
    merged = [r.partition for r in removed if r.had_merged]  # whole or some chunks
    print(
        f"What was merged stays in the store (partitions {merged}); '{args.segment}' stays "
        "paused and is no longer held back by the job: `dmp rules apply` takes it as it is, "
        f"or `dmp rules backfill {args.segment} --days D` starts over"
        if merged
        else f"Nothing had merged; '{args.segment}' stays paused and is no longer held back "
        f"by the job: `dmp rules backfill {args.segment} --days D` starts over"
    )
    if merged:
        print(
            f"note: starting over reads the history again on partitions {merged}, whose "
            "merged history is still in the segment's traits: counting rules would count "
            "it twice there"
        )
    return 0


def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    if args.abandon:
        return _sync(_abandon)(args, settings)

    async def main() -> Report:
        client = connect(settings.redis)
        try:
            backfill = Backfill(settings, client, sys.stderr, chunk_events=args.chunk_events)
            return await backfill.run(
                args.segment, args.days, wait=args.wait, merge_timeout=args.merge_timeout
            )
        finally:
            await client.aclose()

    try:
        report = asyncio.run(main())
    except BackfillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Stages are written whole per partition and merged into a paused segment: nothing
        # a lookup can see changed.
        print(
            f"interrupted: '{args.segment}' stays paused; run the command again (with the "
            "same --days) to finish",
            file=sys.stderr,
        )
        return 130
    print(
        f"{report.job}: read {report.read:,} events in {report.read_seconds:.1f}s "
        f"({report.read_rate:,.0f}/s), {report.staged:,} feed the segment, "
        f"{report.rejected:,} malformed skipped, {report.partitions} partitions "
        f"({report.skipped_partitions} staged before)"
    )
    if report.oldest_available is not None:
        held = (time.time() - report.oldest_available) / 86400
        if held < args.days:
            print(
                f"Kafka holds only {held:.1f} of the {args.days:g} days asked "
                f"(oldest event {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(report.oldest_available))}Z)"
            )
    if report.activated is not None:
        print(f"version {report.activated.number} is live: '{args.segment}' active")
    return 0


def _test(args: argparse.Namespace, settings: Settings) -> int:
    failed = 0
    for file in args.files:
        try:
            rules, cases = load_cases(Path(file))
        except RuleFileError as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            failed += 1
            continue
        for case in cases:
            outcome = run_case(rules, case, file)
            print(f"{'PASS' if outcome.passed else 'FAIL'}  {case.name}")
            for failure in outcome.failures:
                print(f"      {failure}")
            failed += not outcome.passed
    return 1 if failed else 0
