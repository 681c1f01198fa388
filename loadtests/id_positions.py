"""Measure the cookie-id -> bitmap-position design (docs/decisions/0001-cookie-positions.md).

    python -m loadtests.id_positions [--cookies 10000000] [--probes 2000000]

Prints bytes per member for dense per-partition positions against 32-bit hashed ones,
and the false-positive rate of each way a replica finds a cookie.
"""

from __future__ import annotations

import argparse
import random
import time

import orjson
from pyroaring import BitMap, BitMap64

from dmp.ids import LOCAL_BITS, uid_hash
from dmp.replica import SLOT_BITS

PARTITIONS = 4


def dense_bytes_per_member(universe: int, members: int, rng: random.Random) -> float:
    """Segment of ``members`` cookies out of ``universe``, stored as per-partition 2^16 chunks."""
    per_partition = universe // PARTITIONS
    total = 0
    for _ in range(PARTITIONS):
        chosen = BitMap(rng.sample(range(per_partition), members // PARTITIONS))
        for chunk in range(0, per_partition, 1 << 16):
            part = chosen & BitMap(range(chunk, chunk + (1 << 16)))
            if part:
                part.run_optimize()
                total += len(part.serialize())
    return total / members


def hashed32_bytes_per_member(members: int, rng: random.Random) -> float:
    bitmap = BitMap(rng.getrandbits(32) for _ in range(members))
    return len(bitmap.serialize()) / members


def transposed_bytes_per_membership(users: int, per_user: int, rng: random.Random) -> float:
    """The replica's user-major index: ``position << SLOT_BITS | slot``."""
    values = []
    for user in range(users):
        pos = (user % PARTITIONS) << LOCAL_BITS | user // PARTITIONS
        for slot in rng.sample(range(1000), per_user):
            values.append(pos << SLOT_BITS | slot)
    index = BitMap64(values)
    return len(index.serialize()) / len(values)


def false_positives(known: int, probes: int, bits: int) -> tuple[int, int]:
    """Lookups of never-seen cookies that hit a known cookie's position."""
    mask = (1 << bits) - 1
    table = {uid_hash(f"known-{n}") & mask for n in range(known)}
    hits = sum(1 for n in range(probes) if uid_hash(f"unknown-{n}") & mask in table)
    return hits, probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cookies", type=int, default=10_000_000)
    parser.add_argument("--probes", type=int, default=2_000_000)
    args = parser.parse_args()
    rng = random.Random(1)
    started = time.perf_counter()
    result: dict[str, object] = {}
    for members in (1_000_000, args.cookies):
        result[f"dense_bytes_per_member_{members}"] = round(
            dense_bytes_per_member(args.cookies, members, rng), 3
        )
        result[f"hashed32_bytes_per_member_{members}"] = round(
            hashed32_bytes_per_member(members, rng), 3
        )
    result["transposed_bytes_per_membership_1M_users_x20"] = round(
        transposed_bytes_per_membership(1_000_000, 20, rng), 3
    )
    for bits in (32, 64):
        hits, probes = false_positives(args.cookies, args.probes, bits)
        result[f"false_positives_{bits}bit"] = f"{hits}/{probes}"
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
