"""Narrowing helpers for redis-py replies (its stubs allow str or bytes everywhere)."""

from __future__ import annotations


def as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")


def as_opt_bytes(value: object) -> bytes | None:
    return None if value is None else as_bytes(value)


def as_str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
