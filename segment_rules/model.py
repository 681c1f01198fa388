"""The parsed rule language: immutable trees the compiler turns into code.

Three small boolean languages share the ``All``/``AnyOf``/``Not`` nodes:
event predicates (``where:``), history conditions (``rule:``) and segment
algebra (``of:``). Each differs only in its leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


FieldOp = Literal[
    "equals",
    "not_equals",
    "in",
    "not_in",
    "prefix",
    "suffix",
    "contains",
    "regex",
    "gt",
    "gte",
    "lt",
    "lte",
    "between",
    "exists",
    "missing",
    "under",
    "under_iab",
    "host",
    "host_suffix",
    "path_prefix",
]
Scalar = str | int | float | bool
FieldValue = Scalar | frozenset[Scalar] | tuple[float, float] | None


@dataclass(frozen=True)
class FieldTest:
    """A test of one event field; on a list-valued field it holds if any element passes.

    The negative forms (``not_equals``, ``not_in``, ``missing``) are the negation of the
    positive ones, so on a list they hold when *no* element passes. ``expanded`` is the set
    of IAB ids (as text) an ``under_iab`` test accepts: the id and all its descendants.
    """

    path: tuple[str, ...]
    op: FieldOp
    value: FieldValue
    expanded: frozenset[str] = frozenset()


Predicate = FieldTest | All[FieldTest] | AnyOf[FieldTest] | Not[FieldTest]


@dataclass(frozen=True)
class CountWithin:
    """Between ``at_least`` and ``at_most`` events matching ``where`` within ``within`` s."""

    at_least: int
    within: float
    where: Predicate
    at_most: int | None = None


@dataclass(frozen=True)
class NotSeenWithin:
    """Lapsed: a matching event within ``lookback`` but none within ``within``."""

    within: float
    lookback: float
    where: Predicate


@dataclass(frozen=True)
class FirstSeenWithin:
    """New: the first matching event the DMP remembers is within ``within``.

    The memory of a test's events is forgotten ``memory`` seconds after its last event.
    """

    within: float
    memory: float
    where: Predicate


AggregateFunc = Literal["sum", "average"]


@dataclass(frozen=True)
class Aggregate:
    """The sum or average of a numeric field over matching events within a window."""

    func: AggregateFunc
    path: tuple[str, ...]
    within: float
    where: Predicate
    at_least: float | None
    at_most: float | None


@dataclass(frozen=True)
class SequenceRule:
    """Events matching each step in order (strictly later times), first to last within
    ``span``; the last step within ``within`` of now."""

    steps: tuple[Predicate, ...]
    span: float
    within: float


@dataclass(frozen=True)
class ScoreEntry:
    points: float
    where: Predicate


@dataclass(frozen=True)
class Score:
    """Points per matching event (every matching entry adds), at least ``at_least``.

    Windowed (``within``): points of events within the window. Decaying (``half_life``):
    each event's points halve every half-life; forgotten ``memory`` after the last event.
    """

    entries: tuple[ScoreEntry, ...]
    at_least: float
    within: float | None
    half_life: float | None
    memory: float


Leaf = CountWithin | NotSeenWithin | FirstSeenWithin | Aggregate | SequenceRule | Score
Condition = Leaf | All[Leaf] | AnyOf[Leaf] | Not[Leaf]


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
    partners: tuple[tuple[str, str], ...] = ()  # (partner id, the partner's segment id)

    @property
    def is_composite(self) -> bool:
        return self.of is not None

    @property
    def partner_ids(self) -> dict[str, str]:
        return dict(self.partners)


@dataclass(frozen=True)
class RuleWarning:
    """A rule that is valid but probably not what its author meant."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: warning: {self.message}"


DAY = 86400.0
DEFAULT_RETENTION = 90 * DAY
DEFAULT_MAX_TTL = 400 * DAY


@dataclass(frozen=True)
class RuleSet:
    """A whole, validated rule file. ``version`` is the sha256 of its source text."""

    file: str
    version: str
    segments: tuple[Segment, ...]
    retention: float = DEFAULT_RETENTION
    max_ttl: float = DEFAULT_MAX_TTL
    warnings: tuple[RuleWarning, ...] = field(default=())

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
