"""How a cookie id becomes a bitmap position (docs/decisions/0001-cookie-positions.md).

Each Kafka partition numbers the cookies it sees densely (``local`` = 0, 1, 2...), so
bitmaps stay dense (about a byte or two per member) and each partition has one writer.
The global position is ``partition << LOCAL_BITS | local``. Replicas find a cookie's
position through the 64-bit hash of its id.
"""

from __future__ import annotations

import mmh3

LOCAL_BITS = 24
MAX_PARTITIONS = 1 << 8
CHUNK_BITS = 16


def uid_hash(uid: str) -> int:
    """64-bit hash of a cookie id (one collision in ~10^12 lookups among 10M cookies)."""
    return int(mmh3.hash64(uid, signed=False)[0])


def position(partition: int, local: int) -> int:
    if local >= 1 << LOCAL_BITS:
        raise OverflowError(f"partition {partition} has more than {1 << LOCAL_BITS} cookies")
    return partition << LOCAL_BITS | local


def chunk_of(local: int) -> int:
    return local >> CHUNK_BITS
