# Types of the C extension dmp/_events.c (see dmp/events.py).
from collections.abc import Set

def usable(event: object, key: bytes | None, latest: float, types: Set[str]) -> bool: ...
