"""`dmp privacy opt-out|erase|consent|status UID`: the same as the admin endpoints, from a shell."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from dmp.config import Settings
from dmp.events import MAX_UID_LENGTH
from dmp.privacy import ERASED, OPT_OUT, PrivacyStore
from dmp.redis_client import connect
from segment_rules import CompiledRules, RuleFileError, load_rules_file


def add_privacy_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    privacy = sub.add_parser("privacy", help="opt-out, erasure and consent for one cookie")
    actions = privacy.add_subparsers(required=True, metavar="ACTION")
    for name, help_text in (
        ("opt-out", "never segment this cookie again (lookups, exports, ingest)"),
        ("erase", "remove what is stored for the cookie; print what was there"),
        ("consent", "record new consent: lift an erasure"),
        ("status", "print what is stored and suppressed for the cookie"),
    ):
        p = actions.add_parser(name, help=help_text)
        p.add_argument("uid")
        p.set_defaults(func=_run, action=name)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if not 0 < len(args.uid) <= MAX_UID_LENGTH:
        print(f"uid: 1 to {MAX_UID_LENGTH} characters", file=sys.stderr)
        return 2
    try:
        rules: CompiledRules | None = CompiledRules(load_rules_file(settings.rules_path))
    except RuleFileError:
        rules = None  # the report then names base segments only
    doc = asyncio.run(_act(args.action, args.uid, settings, rules))
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    return 0


async def _act(
    action: str, uid: str, settings: Settings, rules: CompiledRules | None
) -> dict[str, object]:
    client = connect(settings.redis)
    try:
        store = PrivacyStore.from_settings(client, settings)
        if action == "status":
            return await store.report(uid, rules)
        if action == "consent":
            return {"uid": uid, "lifted": await store.lift(uid)}
        before = await store.report(uid, rules)
        kind = OPT_OUT if action == "opt-out" else ERASED
        entry = await store.suppress(uid, kind)
        matches = await store.forget_matches(uid) if kind == ERASED else []
        return {
            "uid": uid,
            "status": "opted_out" if kind == OPT_OUT else "erased",
            "at": entry.at,
            "removed": before["stored"],
            "match_table_entries_removed": matches,
        }
    finally:
        await client.aclose()
