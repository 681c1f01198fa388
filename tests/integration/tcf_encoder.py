"""A small TCF v2 core-segment and GPP encoder, for building test strings (tests only)."""

from __future__ import annotations

from collections.abc import Iterable

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _to_base64url(bits: str) -> str:
    bits += "0" * (-len(bits) % 8)  # TC strings are padded to whole bytes
    bits += "0" * (-len(bits) % 6)
    return "".join(ALPHABET[int(bits[i : i + 6], 2)] for i in range(0, len(bits), 6))


def _int(value: int, width: int) -> str:
    assert 0 <= value < 1 << width
    return format(value, f"0{width}b")


def _field(ids: Iterable[int], width: int) -> str:
    chosen = set(ids)
    return "".join("1" if i + 1 in chosen else "0" for i in range(width))


def encode_tc_string(
    *,
    purposes: Iterable[int] = (),
    vendors: Iterable[int] = (),
    last_updated: float = 1_700_000_000.0,
    created: float | None = None,
    ranges: bool = False,
    cmp_id: int = 31,
    version: int = 2,
) -> str:
    vendor_ids = sorted(set(vendors))
    max_vendor = max(vendor_ids, default=0)
    bits = [
        _int(version, 6),
        _int(int((created or last_updated) * 10), 36),
        _int(int(last_updated * 10), 36),
        _int(cmp_id, 12),
        _int(1, 12),  # CMP version
        _int(0, 6),  # consent screen
        _int(4 * 64 + 13, 12),  # "EN"
        _int(126, 12),  # vendor list version
        _int(4, 6),  # policy version
        "0",
        "0",
        _field((), 12),
        _field(purposes, 24),
        _field((), 24),
        "0",
        _int(4 * 64 + 4, 12),  # publisher country "EE"
        _int(max_vendor, 16),
    ]
    if ranges:
        bits.append("1")
        bits.append(_int(len(vendor_ids), 12))
        for v in vendor_ids:
            bits.append("0" + _int(v, 16))
    else:
        bits.append("0")
        bits.append(_field(vendor_ids, max_vendor))
    bits += [_int(0, 16), "0"]  # no legitimate-interest vendors
    bits.append(_int(0, 12))  # no publisher restrictions
    return _to_base64url("".join(bits))


def _fibonacci(n: int) -> str:
    fibs = [1, 2]
    while fibs[-1] <= n:
        fibs.append(fibs[-1] + fibs[-2])
    out = ["0"] * len(fibs)
    for i in range(len(fibs) - 1, -1, -1):
        if fibs[i] <= n:
            out[i] = "1"
            n -= fibs[i]
    return "".join(out).rstrip("0") + "1"


def encode_gpp(sections: dict[int, str]) -> str:
    """A GPP string holding the given encoded sections (ids as single Fibonacci entries)."""
    ids = sorted(sections)
    bits = [_int(3, 6), _int(1, 6), _int(len(ids), 12)]
    last = 0
    for sid in ids:
        bits.append("0" + _fibonacci(sid - last))
        last = sid
    header = "".join(bits)
    header += "0" * (-len(header) % 6)
    encoded = "".join(ALPHABET[int(header[i : i + 6], 2)] for i in range(0, len(header), 6))
    return "~".join([encoded, *(sections[s] for s in ids)])
