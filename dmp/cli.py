"""The ``dmp`` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dmp.config import Settings, describe
from dmp.logs import configure_logging
from dmp.privacy_cli import add_privacy_commands
from dmp.rules_cli import add_rules_commands
from segment_rules import CompiledRules, RuleFileError, load_rules_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level, settings.log_format)
    if args.rules is not None:
        from dataclasses import replace

        settings = replace(settings, rules_path=Path(args.rules))
    code: int = args.func(args, settings)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmp", description="Real-time audience segments.")
    parser.add_argument("--rules", help="rule file (default: $DMP_RULES_PATH or the example)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="consume events from Kafka into Redis")
    p.set_defaults(func=_ingest)
    p = sub.add_parser("lookup", help="serve segment lookups over HTTP")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT); >1 needs PROMETHEUS_MULTIPROC_DIR",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by --workers
    p.set_defaults(func=_lookup)
    p = sub.add_parser("destinations", help="export partners' segment changes (partner file)")
    p.set_defaults(func=_destinations)
    p = sub.add_parser("topics", help="create the Kafka topics (idempotent)")
    p.set_defaults(func=_topics)
    p = sub.add_parser("demo-events", help="produce a small synthetic event stream")
    p.add_argument("--cookies", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_demo_events)
    p = sub.add_parser("config", help="print every setting and its environment variable")
    p.set_defaults(func=_config)

    rules = sub.add_parser("rules", help="work with rule files")
    rules_sub = rules.add_subparsers(required=True, metavar="ACTION")
    p = rules_sub.add_parser("validate", help="check rule files; exit 1 on any error")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_rules_validate)
    add_rules_commands(rules_sub)
    add_privacy_commands(sub)
    return parser


def _load_rules(settings: Settings) -> CompiledRules | None:
    try:
        return CompiledRules(load_rules_file(settings.rules_path))
    except RuleFileError as exc:
        print(exc, file=sys.stderr)
        return None


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from dmp.gc_tuning import tune_for_service
    from dmp.services import serve_ingest

    tune_for_service()
    rules = _load_rules(settings)
    if rules is None:
        return 2
    asyncio.run(serve_ingest(settings, rules))
    return 0


def _lookup(args: argparse.Namespace, settings: Settings) -> int:
    from dmp.gc_tuning import tune_for_service
    from dmp.services import run_lookup_workers, serve_lookup

    tune_for_service()
    rules = _load_rules(settings)
    if rules is None:
        return 2
    if args.workers > 1:
        return run_lookup_workers(settings, args.workers)
    asyncio.run(serve_lookup(settings, rules, worker=args.worker))
    return 0


def _destinations(args: argparse.Namespace, settings: Settings) -> int:
    from bidder_adapter.partner_file import PartnerFileError
    from dmp.destinations_service import serve_destinations

    rules = _load_rules(settings)
    if rules is None:
        return 2
    try:
        asyncio.run(serve_destinations(settings, rules))
    except PartnerFileError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from dmp.topics import create_topics

    created = asyncio.run(create_topics(settings.kafka))
    print(f"topics ready ({', '.join(created) or 'all existed'})")
    return 0


def _demo_events(args: argparse.Namespace, settings: Settings) -> int:
    from dmp.demo_events import produce_demo

    sent = asyncio.run(
        produce_demo(settings.kafka.bootstrap, settings.kafka.topic, args.cookies, args.seed)
    )
    print(f"produced {sent} events for {args.cookies} cookies to {settings.kafka.topic}")
    return 0


def _config(args: argparse.Namespace, settings: Settings) -> int:
    for name, value in describe(settings).items():
        print(f"{name}={value}")
    return 0


def _rules_validate(args: argparse.Namespace, settings: Settings) -> int:
    failed = 0
    for file in args.files:
        try:
            ruleset = load_rules_file(file)
        except RuleFileError as exc:
            failed += 1
            for error in exc.errors:
                print(error, file=sys.stderr)
            continue
        print(f"{file}: ok, {len(ruleset.segments)} segments, version {ruleset.version[:12]}")
        for warning in ruleset.warnings:
            print(warning, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
