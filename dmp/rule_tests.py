"""Ad-ops-written rule tests: "given these events, cookie X is in / out of segment Y at time T".

Cases run through the same code as ingest (``plan_batch`` with the compiled rules), so a
passing case means production would decide the same. Times are written relative to the
case's moment zero (``-3d``, ``+12h``, ``0``), which keeps cases valid forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmp.partition_batch import plan_batch
from segment_rules import CompiledRules, RuleFileError, load_rules_file
from segment_rules.durations import parse_duration
from segment_rules.yaml_source import YNode, parse_yaml

ZERO = 1_800_000_000.0  # moment zero of every case (any fixed time would do)
_OFFSET = re.compile(r"^\s*([+-])\s*(.+)$")


@dataclass(frozen=True)
class Expectation:
    uid: str
    at: float
    inside: tuple[str, ...]
    outside: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Case:
    name: str
    events: tuple[dict[str, Any], ...]
    expectations: tuple[Expectation, ...]


@dataclass(frozen=True)
class Outcome:
    case: str
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def offset(node: YNode) -> float:
    value = node.value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ZERO + float(value)
    match = _OFFSET.match(str(value))
    if match is None:
        raise _fail(
            node,
            f"a time is 0, '-3d' or '+12h' (relative to the case's moment zero), got {value!r}",
        )
    try:
        seconds = parse_duration(match.group(2).strip())
    except ValueError as exc:
        raise _fail(node, str(exc)) from None
    return ZERO + (seconds if match.group(1) == "+" else -seconds)


def _fail(node: YNode, message: str) -> RuleFileError:
    return RuleFileError([node.loc.error(message)])


def load_cases(path: Path) -> tuple[CompiledRules, list[Case]]:
    root = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not root.is_mapping or "cases" not in root.value:
        raise _fail(root, "a rule test file has 'rules: <rule file>' and 'cases:'")
    rules_node = root.value.get("rules")
    if rules_node is None:
        raise _fail(root, "name the rule file under test: 'rules: ../segments.yaml'")
    rules = CompiledRules(load_rules_file(path.parent / str(rules_node.value)))
    cases = []
    for case_node in root.value["cases"].value:
        name = case_node.value.get("name")
        events = []
        for ev in case_node.value.get("events", YNode(case_node.loc, [])).value:
            event = ev.plain()
            event["ts"] = offset(ev.value["ts"]) if "ts" in ev.value else ZERO
            events.append(event)
        expectations = []
        for ex in case_node.value.get("expect", YNode(case_node.loc, [])).value:
            plain = ex.plain()
            if "uid" not in plain:
                raise _fail(ex, "an expectation names the cookie: 'uid: c1'")
            at = offset(ex.value["at"]) if "at" in ex.value else ZERO
            expectations.append(
                Expectation(
                    plain["uid"],
                    at,
                    tuple(plain.get("in", ())),
                    tuple(plain.get("out", ())),
                    ex.loc.line,
                )
            )
        label = str(name.value) if name is not None else f"case at line {case_node.loc.line}"
        cases.append(Case(label, tuple(events), tuple(expectations)))
    return rules, cases


def run_case(rules: CompiledRules, case: Case, file: str) -> Outcome:
    failures = []
    known = {s.id for s in rules.ruleset.segments}
    for ex in case.expectations:
        for seg in (*ex.inside, *ex.outside):
            if seg not in known:
                failures.append(f"{file}:{ex.line}: unknown segment '{seg}'")
        # Everything that happened by then, applied in one batch as ingest would at that time.
        arrived = [e for e in case.events if e["ts"] <= ex.at]
        uids = {e["uid"] for e in arrived}
        plan = plan_batch(rules, arrived, [], dict.fromkeys(uids), 0, ex.at)
        state = plan.states.get(ex.uid)
        members = rules.with_composites(state.members) if state is not None else []
        when = f"{ex.at - ZERO:+g}s"
        for seg in ex.inside:
            if seg not in members:
                failures.append(
                    f"{file}:{ex.line}: {ex.uid} should be in {seg} at {when}; is in {members}"
                )
        for seg in ex.outside:
            if seg in members:
                failures.append(
                    f"{file}:{ex.line}: {ex.uid} should not be in {seg} at {when}; is in {members}"
                )
    return Outcome(case.name, tuple(failures))
