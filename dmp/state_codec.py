"""Cookie states as compact bytes (docs/decisions/0019): the codec behind CookieState.

Format 1, little-endian, after the tag byte 0x01 (a JSON state starts with ``{``):

    uvarint local
    uvarint member count, then each member: a text (sorted by the caller)
    uvarint trait count, then each trait: a text (its id), then its list:
        b"D" uvarint n, n doubles                    every entry a float (times)
        b"P" uvarint n, n pairs of doubles           every entry a list of two floats
        b"G" uvarint n, n items                      anything else:
            b"d" double | b"i" int64 | b"l" uvarint m, m of (b"d" double | b"i" int64)
    a text: uvarint (n << 1 | 1), then n bytes, when it is 2n lowercase hex digits (trait
        ids are: half their size); else uvarint (n << 1), then its n UTF-8 bytes

A history holding anything else (a bool, an int past 64 bits, deeper lists) is not
encodable: ``encode`` raises ``Unencodable`` and CookieState stores that one as JSON, which
``decode`` still reads, as it reads every state written before this format.

The C extension (dmp/_states.c) does the same, byte for byte; a property test holds them
equal. Both give lists (mutable, as the rule kernel changes them in place), ints as ints and
floats as floats, so a decoded state encodes to the same bytes again.
"""

from __future__ import annotations

import re
import struct
from typing import Any

FORMAT_1 = 0x01
_INT64 = (-(1 << 63), (1 << 63) - 1)
_DOUBLE = struct.Struct("<d")
_LONG = struct.Struct("<q")
_HEX = re.compile("[0-9a-f]+")


class Unencodable(ValueError):
    """The state holds something format 1 does not carry; it is stored as JSON instead."""


try:
    from dmp import _states
except ImportError:  # not built (pip install -e . builds it): the Python below does it alone
    _states = None  # type: ignore[assignment]  # a module when built, else None


def _uvarint(out: bytearray, value: int) -> None:
    if value < 0:
        raise Unencodable("negative count or position")
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _text(out: bytearray, text: object) -> None:
    if type(text) is not str:
        raise Unencodable(f"a key or member is {type(text).__name__}, not str")
    if text and len(text) % 2 == 0 and _HEX.fullmatch(text):
        raw = bytes.fromhex(text)
        _uvarint(out, len(raw) << 1 | 1)
        out += raw
        return
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise Unencodable("a key or member is not valid UTF-8") from None
    _uvarint(out, len(raw) << 1)
    out += raw


def _number(out: bytearray, value: object) -> None:
    if type(value) is float:
        out += b"d"
        out += _DOUBLE.pack(value)
    elif type(value) is int and _INT64[0] <= value <= _INT64[1]:
        out += b"i"
        out += _LONG.pack(value)
    else:
        raise Unencodable(f"a history entry holds {type(value).__name__}")


def _entries(out: bytearray, entries: object) -> None:
    if type(entries) is not list:
        raise Unencodable(f"a trait's history is {type(entries).__name__}, not list")
    n = len(entries)
    if all(type(e) is float for e in entries):
        out += b"D"
        _uvarint(out, n)
        out += struct.pack(f"<{n}d", *entries)
    elif all(
        type(e) is list and len(e) == 2 and type(e[0]) is float and type(e[1]) is float
        for e in entries
    ):
        out += b"P"
        _uvarint(out, n)
        out += struct.pack(f"<{2 * n}d", *(x for e in entries for x in e))
    else:
        out += b"G"
        _uvarint(out, n)
        for entry in entries:
            if type(entry) is list:
                out += b"l"
                _uvarint(out, len(entry))
                for value in entry:
                    _number(out, value)
            else:
                _number(out, entry)


def encode(local: int, history: dict[str, list[Any]], members: list[str]) -> bytes:
    """Format 1 bytes of a state; ``members`` already sorted. Raises Unencodable."""
    if _states is not None:
        raw = _states.encode(local, history, members)
        if raw is None:
            raise Unencodable("the state holds something format 1 does not carry")
        return raw
    return encode_py(local, history, members)


def encode_py(local: int, history: dict[str, list[Any]], members: list[str]) -> bytes:
    """encode() in Python: the reference the C extension is held equal to."""
    if type(local) is not int or not 0 <= local <= _INT64[1]:
        raise Unencodable("local is not a non-negative 64-bit int")
    if type(history) is not dict or type(members) is not list:
        raise Unencodable("history is not a dict or members not a list")
    out = bytearray([FORMAT_1])
    _uvarint(out, local)
    _uvarint(out, len(members))
    for member in members:
        _text(out, member)
    _uvarint(out, len(history))
    for trait, entries in history.items():
        _text(out, trait)
        _entries(out, entries)
    return bytes(out)


def _malformed(what: str) -> ValueError:
    return ValueError(f"malformed state: {what}")  # the C extension's words too


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 1  # past the format tag

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            if self.at >= len(self.data) or shift > 63:
                raise _malformed("truncated or varint too long")
            byte = self.data[self.at]
            self.at += 1
            if shift == 63 and byte > 1:
                raise _malformed("varint past 64 bits")
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise _malformed("truncated")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def text(self) -> str:
        size = self.uvarint()
        raw = self.take(size >> 1)
        return raw.hex() if size & 1 else raw.decode("utf-8")

    def number(self) -> float | int:
        tag = self.take(1)
        if tag == b"d":
            return float(_DOUBLE.unpack(self.take(8))[0])
        if tag == b"i":
            return int(_LONG.unpack(self.take(8))[0])
        raise _malformed(f"unknown number tag {tag!r}")

    def entries(self) -> list[Any]:
        tag = self.take(1)
        n = self.uvarint()
        if tag == b"D":
            return list(struct.unpack(f"<{n}d", self.take(8 * n)))
        if tag == b"P":
            flat = struct.unpack(f"<{2 * n}d", self.take(16 * n))
            return [[flat[2 * i], flat[2 * i + 1]] for i in range(n)]
        if tag == b"G":
            out: list[Any] = []
            for _ in range(n):
                if self.data[self.at : self.at + 1] == b"l":
                    self.at += 1
                    out.append([self.number() for _ in range(self.uvarint())])
                else:
                    out.append(self.number())
            return out
        raise _malformed(f"unknown list tag {tag!r}")


def decode(data: bytes | bytearray | memoryview) -> tuple[int, dict[str, list[Any]], list[str]]:
    """(local, history, members) of format 1 bytes; ValueError if they are not that."""
    if _states is not None:
        return _states.decode(data)
    return decode_py(data)


def decode_py(data: bytes | bytearray | memoryview) -> tuple[int, dict[str, list[Any]], list[str]]:
    """decode() in Python: the reference the C extension is held equal to."""
    data = bytes(data)  # any buffer, as the C extension takes
    if not data or data[0] != FORMAT_1:
        raise _malformed("not format 1")
    reader = _Reader(data)
    local = reader.uvarint()
    members = [reader.text() for _ in range(reader.uvarint())]
    history = {}
    for _ in range(reader.uvarint()):
        trait = reader.text()
        history[trait] = reader.entries()
    if reader.at != len(data):
        raise _malformed("trailing bytes after the state")
    return local, history, members
