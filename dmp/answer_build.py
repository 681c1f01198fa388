"""The compiled cache-miss path of a lookup (dmp/_answers.c), and its Python twin's inputs.

A cache-missing lookup reads the cookie's run of the user-major index, maps slots to ranks,
adds the composites the ranks satisfy, sorts and names them. In Python that was ~12 us
(hundreds of operations on ints spread over memory); the C builder does the same from the
same pyroaring iterator in a few, and writes the JSON array the lookup sends while it is at
it (docs/decisions/0012). ``build_at`` reads the bitmap through CRoaring's own iterator
instead, 64 values a call (docs/decisions/0013), when pyroaring's module exports it.
Without the extension, dmp/replica.py's Python answers alone.

The extension also holds one step of a replica's load, ``interleave`` (a chunk's memberships
in user-major order by a counting sort, docs/decisions/0014); without it numpy sorts.

Composites become a small stack program: ``REF r`` (is rank r held), ``FALSE`` (a
reference to a segment that is not active), ``NOT``, ``AND n`` / ``OR n`` (of the top n),
and ``SET r`` (add rank r when the top is true), one composite after another in dependency
order, so a composite of composites reads what the earlier ones added.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import pyroaring
from pyroaring import BitMap64

from segment_rules.model import All, Composite, Not, Segment, SegmentRef

try:
    from dmp._answers import (
        INACTIVE,
        MAX_SLOTS,
        OP_AND,
        OP_FALSE,
        OP_NOT,
        OP_OR,
        OP_REF,
        OP_SET,
        AnswerBuilder,
        bind_roaring,
        find_position,
        interleave,
    )
except ImportError:  # not built (pip install -e . builds it): the Python answers alone
    AnswerBuilder = None  # type: ignore[assignment,misc]  # a class when built, else None
    find_position = None  # type: ignore[assignment]  # a function when built, else None
    interleave = None  # type: ignore[assignment]  # a function when built, else None
    bind_roaring = None  # type: ignore[assignment]  # a function when built, else None
    OP_REF, OP_FALSE, OP_NOT, OP_AND, OP_OR, OP_SET = range(6)
    MAX_SLOTS = INACTIVE = 0

__all__ = [
    "AnswerBuilder",
    "available",
    "bind_roaring",
    "check_limits",
    "composite_program",
    "find_position",
    "interleave",
    "rank_table",
    "reads_bitmaps",
]


def available() -> bool:
    return AnswerBuilder is not None


def _bind_roaring() -> bool:
    """Whether ``AnswerBuilder.build_at`` may read BitMap64s: pyroaring gives their address
    (``raw_pointer``, pyroaring 1.2) and its module exports CRoaring's iterator."""
    if bind_roaring is None or not hasattr(BitMap64, "raw_pointer"):
        return False
    path = getattr(pyroaring, "__file__", None)
    return path is not None and bind_roaring(path)


READS_BITMAPS = _bind_roaring()


def reads_bitmaps() -> bool:
    return READS_BITMAPS


def check_limits(max_slots: int, inactive: int) -> None:
    """Refuse a built extension whose slot count or inactive rank differ from the replica's."""
    if available() and (max_slots, inactive) != (MAX_SLOTS, INACTIVE):
        raise ImportError(
            f"dmp._answers was built for {MAX_SLOTS} slots and inactive rank {INACTIVE}, "
            f"the replica has {max_slots} and {inactive}: rebuild it (pip install -e .)"
        )


def composite_program(composites: Sequence[Segment], active: dict[str, int]) -> bytes:
    """The composites (in dependency order) as the builder's program, int32 values."""
    ops = array("i")

    def emit(node: Composite) -> None:
        if isinstance(node, SegmentRef):
            rank = active.get(node.segment_id)
            ops.extend([OP_FALSE] if rank is None else [OP_REF, rank])
        elif isinstance(node, Not):
            emit(node.part)
            ops.append(OP_NOT)
        else:  # all / any, as dmp.replica's generated Python reads them
            for part in node.parts:
                emit(part)
            ops.extend([OP_AND if isinstance(node, All) else OP_OR, len(node.parts)])

    for comp in composites:
        if comp.id in active and comp.of is not None:
            emit(comp.of)
            ops.extend([OP_SET, active[comp.id]])
    return ops.tobytes()


def rank_table(ranks: Sequence[int]) -> bytes:
    """A partition's slot -> rank list as the builder reads it (uint32 values)."""
    return array("I", ranks).tobytes()
