# Types of the C extension dmp/_answers.c (see dmp/answer_build.py).
from collections.abc import Iterable, Sequence

MAX_SLOTS: int
INACTIVE: int
OP_REF: int
OP_FALSE: int
OP_NOT: int
OP_AND: int
OP_OR: int
OP_SET: int

class AnswerBuilder:
    def __init__(self, names: Sequence[str], encoded: Sequence[bytes], program: bytes) -> None: ...
    def build(
        self, values: Iterable[int], start: int, slot_ranks: bytes
    ) -> tuple[tuple[str, ...], bytes]: ...
    # Internal: bitmap_pointer must be a live BitMap64's raw_pointer (any other int crashes).
    def build_at(
        self, bitmap_pointer: int, start: int, slot_ranks: bytes
    ) -> tuple[tuple[str, ...], bytes]: ...

def bind_roaring(path: str) -> bool: ...
def find_position(
    hashes: object, positions: object, buckets: object, shift: int, h: int
) -> int | None: ...
def interleave(
    parts: Sequence[tuple[int, object]], low: int, span: int, slot_bits: int, out: object
) -> None: ...
