"""Checks on segments built from other segments: references exist and form no cycle."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from segment_rules.errors import RuleError
from segment_rules.model import All, Composite, Not, Segment, SegmentRef


def refs(expr: Composite) -> Iterator[SegmentRef]:
    if isinstance(expr, SegmentRef):
        yield expr
    elif isinstance(expr, Not):
        yield from refs(expr.part)
    else:
        for part in expr.parts:
            yield from refs(part)


def check_composites(segments: Sequence[Segment]) -> list[RuleError]:
    by_id = {s.id: s for s in segments}
    errors: list[RuleError] = []
    for seg in segments:
        if seg.of is None:
            continue
        for ref in refs(seg.of):
            if ref.segment_id not in by_id:
                errors.append(
                    ref.loc.error(
                        f"segment '{seg.id}' refers to '{ref.segment_id}', which is not defined in this file"
                    )
                )
        if _matches_nobody_check(seg.of):
            errors.append(
                seg.loc.error(
                    f"segment '{seg.id}' would hold every cookie in none of its parts; "
                    "combine 'not' with at least one positive segment under 'and'"
                )
            )
    if errors:
        return errors
    return _cycles(segments, by_id)


def _matches_nobody_check(expr: Composite) -> bool:
    """True when a cookie in no segment at all would satisfy ``expr`` (an unbounded audience)."""
    return evaluate_composite(expr, frozenset())


def evaluate_composite(expr: Composite, members: frozenset[str] | set[str]) -> bool:
    if isinstance(expr, SegmentRef):
        return expr.segment_id in members
    if isinstance(expr, Not):
        return not evaluate_composite(expr.part, members)
    if isinstance(expr, All):
        return all(evaluate_composite(p, members) for p in expr.parts)
    return any(evaluate_composite(p, members) for p in expr.parts)


def _cycles(segments: Sequence[Segment], by_id: dict[str, Segment]) -> list[RuleError]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    errors: list[RuleError] = []

    def visit(seg: Segment, path: list[str]) -> None:
        state[seg.id] = 1
        if seg.of is not None:
            for ref in refs(seg.of):
                target = by_id[ref.segment_id]
                if state.get(target.id) == 1:
                    cycle = [*path[path.index(target.id) :], target.id]
                    errors.append(
                        ref.loc.error(
                            f"segments refer to each other in a cycle: {' -> '.join(cycle)}; break the loop"
                        )
                    )
                elif target.id not in state:
                    visit(target, [*path, target.id])
        state[seg.id] = 2

    for seg in segments:
        if seg.id not in state:
            visit(seg, [seg.id])
    return errors


def topological_order(segments: Sequence[Segment]) -> list[Segment]:
    """Composites after everything they refer to (the file has passed check_composites)."""
    by_id = {s.id: s for s in segments}
    done: set[str] = set()
    order: list[Segment] = []

    def visit(seg: Segment) -> None:
        if seg.id in done:
            return
        done.add(seg.id)
        if seg.of is not None:
            for ref in refs(seg.of):
                visit(by_id[ref.segment_id])
        order.append(seg)

    for seg in segments:
        visit(seg)
    return order
