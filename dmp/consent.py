"""Consent carried by events: IAB TCF v2 TC strings and GPP strings, and the policy on them.

Decoded here rather than by a library: the one PyPI package for TCF (``iab-tcf``, last
released 2022) installs a top-level ``tests`` package that would shadow ours, has no types,
and reads no GPP. What segmentation needs is small and fixed by the specs:

- TCF v2 core segment (IAB TCF v2.2 "TC String" format): version (6 bits), created and
  last updated (36 bits each, deciseconds), CMP id and version, consent screen, language,
  vendor list and policy versions, two flags, special features (12), purpose consents (24),
  purpose legitimate interests (24), purpose one treatment, publisher country, then the
  vendor consent section (max vendor id, bit field or ranges).
- GPP (IAB Global Privacy Platform): a header section (type 3, version 1, the ids of the
  sections present as a Fibonacci-coded range) and the sections, joined by ``~``; section 2
  (``tcfeuv2``) is a TCF v2 string.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dmp.config import PrivacySettings

POLICIES = ("off", "when_gdpr_applies", "always")
GPP_TCF_EU_V2 = 2
_CACHE_SIZE = 100_000


class ConsentStringError(ValueError):
    """The string is not a TCF v2 / GPP string we can read."""


class _Bits:
    """The bits of one base64url segment, six per character, as a text of 0s and 1s.

    Six per character because encoders pad to 6 bits, not 8: the segment is padded with
    "A" (zero bits) to whole bytes and cut back after. Text because slicing it is linear,
    where reading fields off one big integer made a 1,000-vendor string cost 200 us.
    """

    def __init__(self, segment: str) -> None:
        segment = segment.rstrip("=")
        padded = segment + "A" * (-len(segment) % 4)
        try:
            raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ConsentStringError("not base64url") from None
        self.bits = format(int.from_bytes(raw, "big"), f"0{len(raw) * 8}b")[: len(segment) * 6]
        self.length = len(self.bits)
        self.pos = 0

    def take(self, n: int) -> str:
        if self.pos + n > self.length:
            raise ConsentStringError("string ends early")
        self.pos += n
        return self.bits[self.pos - n : self.pos]

    def read(self, n: int) -> int:
        return int(self.take(n), 2)

    def fibonacci(self) -> int:
        """One Fibonacci-coded integer (Zeckendorf bits, lowest first, ended by "11")."""
        end = self.bits.find("11", self.pos)
        if end < 0 or end + 2 - self.pos > 64:
            raise ConsentStringError("bad Fibonacci number")
        code = self.take(end + 2 - self.pos)
        fibs = [1, 2]
        while len(fibs) < len(code):
            fibs.append(fibs[-1] + fibs[-2])
        return sum(f for f, bit in zip(fibs, code[:-1], strict=False) if bit == "1")


@dataclass(frozen=True)
class TCString:
    version: int
    created_ds: int  # deciseconds since the epoch
    last_updated_ds: int
    cmp_id: int
    vendor_list_version: int
    policy_version: int
    special_features: frozenset[int]
    purpose_consents: frozenset[int]
    purpose_legitimate_interests: frozenset[int]
    vendor_consents: frozenset[int]

    @property
    def last_updated(self) -> float:
        return self.last_updated_ds / 10.0


def _bitfield(bits: _Bits, n: int) -> frozenset[int]:
    field = bits.take(n)
    found = []
    i = field.find("1")
    while i >= 0:
        found.append(i + 1)
        i = field.find("1", i + 1)
    return frozenset(found)


def _vendor_section(bits: _Bits, max_vendor: int) -> frozenset[int]:
    if not bits.read(1):
        return _bitfield(bits, max_vendor)
    found: set[int] = set()  # range encoding
    for _ in range(bits.read(12)):
        if bits.read(1):
            start, end = bits.read(16), bits.read(16)
            if end < start or end > max_vendor:
                raise ConsentStringError("bad vendor range")
            found.update(range(start, end + 1))
        else:
            found.add(bits.read(16))
    return frozenset(found)


def decode_tc_string(tc: str, *, vendors: bool = True) -> TCString:
    """The core segment of a TCF v2 TC string (later segments, after '.', are not needed).

    With ``vendors=False`` the vendor section is not read (``vendor_consents`` is empty).
    """
    core = tc.strip().split(".", 1)[0]
    if not core:
        raise ConsentStringError("empty TC string")
    bits = _Bits(core)
    version = bits.read(6)
    if version != 2:
        raise ConsentStringError(f"TC string version {version}, not 2")
    created = bits.read(36)
    updated = bits.read(36)
    cmp_id = bits.read(12)
    bits.read(12)  # CMP version
    bits.read(6)  # consent screen
    bits.read(12)  # consent language
    vendor_list_version = bits.read(12)
    policy_version = bits.read(6)
    bits.read(1)  # is service specific
    bits.read(1)  # use non-standard texts
    special = _bitfield(bits, 12)
    purposes = _bitfield(bits, 24)
    legitimate = _bitfield(bits, 24)
    bits.read(1)  # purpose one treatment
    bits.read(12)  # publisher country code
    max_vendor = bits.read(16)
    vendor_consents = _vendor_section(bits, max_vendor) if vendors else frozenset()
    return TCString(
        version=version,
        created_ds=created,
        last_updated_ds=updated,
        cmp_id=cmp_id,
        vendor_list_version=vendor_list_version,
        policy_version=policy_version,
        special_features=special,
        purpose_consents=purposes,
        purpose_legitimate_interests=legitimate,
        vendor_consents=vendor_consents,
    )


def gpp_sections(gpp: str) -> dict[int, str]:
    """Section id -> encoded section, from a GPP string's header."""
    parts = gpp.strip().split("~")
    bits = _Bits(parts[0])
    kind, version = bits.read(6), bits.read(6)
    if kind != 3:
        raise ConsentStringError(f"GPP header type {kind}, not 3")
    if version != 1:
        raise ConsentStringError(f"GPP version {version}, not 1")
    ids: list[int] = []
    last = 0
    for _ in range(bits.read(12)):
        if bits.read(1):
            start = last + bits.fibonacci()
            end = start + bits.fibonacci()
            ids.extend(range(start, end + 1))
            last = end
        else:
            last += bits.fibonacci()
            ids.append(last)
    if len(ids) != len(parts) - 1:
        raise ConsentStringError(f"GPP header names {len(ids)} sections, {len(parts) - 1} given")
    return dict(zip(ids, parts[1:], strict=True))


def tc_string_of(event: Mapping[str, Any]) -> str | None:
    """The TC string an event carries: `consent`, or the tcfeuv2 section of `gpp`."""
    consent = event.get("consent")
    if isinstance(consent, str) and consent:
        return consent
    gpp = event.get("gpp")
    if isinstance(gpp, str) and gpp:
        try:
            return gpp_sections(gpp).get(GPP_TCF_EU_V2)
        except ConsentStringError:
            return ""  # present but unreadable: never taken as consent
    return None


@dataclass(frozen=True)
class Verdict:
    usable: bool
    reason: str  # "" when usable; else a bounded label for metrics
    last_updated: float = 0.0  # of the consent that made it usable, 0 if none


USABLE_WITHOUT_STRING = Verdict(True, "")


class ConsentPolicy:
    """Whether an event may be used for segmentation, by the deployment's settings."""

    def __init__(self, settings: PrivacySettings) -> None:
        if settings.consent_policy not in POLICIES:
            raise ValueError(
                f"DMP_PRIVACY_CONSENT_POLICY={settings.consent_policy!r}: one of {POLICIES}"
            )
        self.policy = settings.consent_policy
        try:
            self.purposes = frozenset(
                int(p) for p in settings.consent_purposes.split(",") if p.strip()
            )
        except ValueError:
            raise ValueError(
                f"DMP_PRIVACY_CONSENT_PURPOSES={settings.consent_purposes!r}: numbers, comma-separated"
            ) from None
        if any(not 1 <= p <= 24 for p in self.purposes):
            raise ValueError("DMP_PRIVACY_CONSENT_PURPOSES: TCF purposes are 1 to 24")
        self.vendor_id = settings.vendor_id
        self._cache: dict[str, Verdict] = {}

    def verdict(self, event: Mapping[str, Any]) -> Verdict:
        if self.policy == "off":
            return USABLE_WITHOUT_STRING
        tc = tc_string_of(event)
        if tc is None:
            gdpr = event.get("gdpr")
            if self.policy == "when_gdpr_applies" and gdpr in (None, 0, "0", False):
                return USABLE_WITHOUT_STRING
            return Verdict(False, "no_consent")
        return self.judge(tc)

    def judge(self, tc: str) -> Verdict:
        """The verdict on one TC string; cached, since one user's string repeats."""
        verdict = self._cache.get(tc)
        if verdict is None:
            verdict = self._judge(tc)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[tc] = verdict
        return verdict

    def _judge(self, tc: str) -> Verdict:
        try:
            decoded = decode_tc_string(tc, vendors=bool(self.vendor_id))
        except ConsentStringError:
            return Verdict(False, "unreadable")
        if not self.purposes <= decoded.purpose_consents:
            return Verdict(False, "purposes")
        if self.vendor_id and self.vendor_id not in decoded.vendor_consents:
            return Verdict(False, "vendor")
        return Verdict(True, "", decoded.last_updated)
