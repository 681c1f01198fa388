"""The parsed rule language: immutable trees the compiler turns into code.

Three small boolean languages share the ``All``/``AnyOf``/``Not`` nodes:
event predicates (``where:``), history conditions (``rule:``) and segment
algebra (``of:``). Each differs only in its leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from segment_rules.yaml_source import Loc

T = TypeVar("T")


@dataclass(frozen=True)
class All(Generic[T]):
    parts: tuple[T | All[T] | AnyOf[T] | Not[T], ...]


@dataclass(frozen=True)
class AnyOf(Generic[T]):
    parts: tuple[T | All[T] | AnyOf[T] | Not[T], ...]


@dataclass(frozen=True)
class Not(Generic[T]):
    part: T | All[T] | AnyOf[T] | Not[T]


FieldOp = Literal["equals", "in", "prefix"]


@dataclass(frozen=True)
class FieldTest:
    """A test of one event field; on a list-valued field it holds if any element passes."""

    path: tuple[str, ...]
    op: FieldOp
    value: str | int | float | bool | frozenset[str | int | float | bool]


Predicate = FieldTest | All[FieldTest] | AnyOf[FieldTest] | Not[FieldTest]


@dataclass(frozen=True)
class CountWithin:
    """At least ``at_least`` events matching ``where`` within ``within`` seconds of now."""

    at_least: int
    within: float
    where: Predicate


Condition = CountWithin | All[CountWithin] | AnyOf[CountWithin] | Not[CountWithin]


@dataclass(frozen=True)
class SegmentRef:
    segment_id: str
    loc: Loc


Composite = SegmentRef | All[SegmentRef] | AnyOf[SegmentRef] | Not[SegmentRef]

Status = Literal["active", "paused"]


@dataclass(frozen=True)
class Segment:
    """One audience. Exactly one of ``rule`` (from events) or ``of`` (from other segments)."""

    id: str
    name: str
    description: str
    owner: str
    iab_ids: tuple[int, ...]
    ttl: float | None
    status: Status
    rule: Condition | None
    of: Composite | None
    loc: Loc

    @property
    def is_composite(self) -> bool:
        return self.of is not None


@dataclass(frozen=True)
class RuleSet:
    """A whole, validated rule file. ``version`` is the sha256 of its source text."""

    file: str
    version: str
    segments: tuple[Segment, ...]

    def segment(self, segment_id: str) -> Segment:
        for seg in self.segments:
            if seg.id == segment_id:
                return seg
        raise KeyError(segment_id)

    @property
    def base_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.rule is not None)

    @property
    def composite_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.of is not None)
