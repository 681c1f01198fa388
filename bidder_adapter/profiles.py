"""Partner profiles: who may call us, which segments they may see, and how we name them."""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from types import MappingProxyType
from typing import Final, Literal, cast
from urllib.parse import urlsplit

from bidder_adapter.destination_config import DestinationConfig, read_destination
from bidder_adapter.doc_reader import DocReader, describe

Kind = Literal["dsp", "ssp"]
OutputFormat = Literal["openrtb", "ids"]
UserIdSource = Literal["cookie", "buyeruid", "eids"]

KINDS: Final[tuple[Kind, ...]] = ("dsp", "ssp")
OUTPUT_FORMATS: Final[tuple[OutputFormat, ...]] = ("openrtb", "ids")
USER_ID_SOURCES: Final[tuple[UserIdSource, ...]] = ("cookie", "buyeruid", "eids")
# segtax 4 is IAB Audience Taxonomy 1.1; 500 and up are reserved for vendor taxonomies.
SEGTAX_IAB_AUDIENCE_1_1: Final = 4
SEGTAX_VENDOR_MIN: Final = 500

_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
# Partner ids become parts of Redis keys and URL paths: keep them to a safe alphabet.
_PARTNER_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The sync URL macro for our cookie id (OpenRTB 2.6 Appendix C; `${UID}` as Prebid uses it).
UID_MACRO: Final = "${UID}"


def hash_api_key(key: str) -> str:
    """Hex SHA-256 of an API key, the only form in which keys are stored."""
    # surrogatepass: a presented key is caller-controlled text and must never make us raise.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# The place of every segment not granted, in PartnerProfile.view: after all the others.
_UNGRANTED = sys.maxsize


class PartnerProfileError(ValueError):
    """Invalid partner configuration; `messages` each start with the path of the bad value."""

    def __init__(self, messages: Iterable[str], source_name: str = "partner profile") -> None:
        self.messages: list[str] = list(messages)
        self.source_name = source_name
        lines = "\n".join(f"  {m}" for m in self.messages)
        super().__init__(f"{source_name}: {len(self.messages)} problem(s):\n{lines}")


def _one_of(value: str, choices: tuple[str, ...]) -> str | None:
    if value in choices:
        return None
    return f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"


@dataclass(frozen=True, slots=True)
class PartnerProfile:
    """One DSP or SSP; constructing it checks every value (types are mypy's job)."""

    partner_id: str
    kind: Kind
    api_key_sha256: str
    granted_segments: frozenset[str]
    # Excluded from hashing: a mapping is not hashable, and the id already identifies a partner.
    segment_id_map: Mapping[str, str] = field(hash=False)
    output_format: OutputFormat
    segtax: int
    data_provider_id: str
    data_provider_name: str
    max_segments: int
    user_id_sources: tuple[UserIdSource, ...]
    eids_sources: tuple[str, ...] = ()
    # Where we send browsers to sync (ours-initiated); must hold ${UID}. Empty: no redirect.
    sync_url: str = ""
    # Prebid bidder code whose ortb2 fragment carries this partner's view; empty: none.
    prebid_bidder: str = ""
    destination: DestinationConfig | None = None
    # What ``view`` needs, worked out once (it runs per user at bid time): each granted id's
    # place in sorted order, the partner's id at each place, and whether those are distinct.
    _view_places: Mapping[str, int] = field(init=False, repr=False, compare=False, hash=False)
    _view_ids: tuple[str, ...] = field(init=False, repr=False, compare=False, hash=False)
    _view_distinct: bool = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Copy behind a read-only proxy so a caller's dict cannot change a "frozen" profile later.
        object.__setattr__(self, "segment_id_map", MappingProxyType(dict(self.segment_id_map)))
        problems = list(self._problems())
        if problems:
            raise PartnerProfileError(problems, f"partner {self.partner_id!r}")
        ours = sorted(self.granted_segments)
        theirs = tuple(self.segment_id_map.get(s, s) for s in ours)
        object.__setattr__(self, "_view_places", {s: n for n, s in enumerate(ours)})
        object.__setattr__(self, "_view_ids", theirs)
        object.__setattr__(self, "_view_distinct", len(set(theirs)) == len(theirs))

    def _problems(self) -> Iterator[str]:
        for name in ("partner_id", "data_provider_id", "data_provider_name"):
            if not getattr(self, name):
                yield f"{name}: must not be empty"
        if self.partner_id and not _PARTNER_ID.fullmatch(self.partner_id):
            yield "partner_id: use 1 to 64 letters, digits, '.', '_' or '-'"
        if (msg := _one_of(self.kind, KINDS)) is not None:
            yield f"kind: {msg}"
        if not _SHA256_HEX.fullmatch(self.api_key_sha256):
            yield "api_key_sha256: must be 64 lowercase hex characters (SHA-256 of the key)"
        if "" in self.granted_segments:
            yield "granted_segments: must not contain an empty id"
        for ours, theirs in self.segment_id_map.items():
            if ours not in self.granted_segments:
                yield f"segment_id_map.{ours}: not in granted_segments"
            if not theirs:
                yield f"segment_id_map.{ours}: must not be empty"
        if (msg := _one_of(self.output_format, OUTPUT_FORMATS)) is not None:
            yield f"output_format: {msg}"
        if self.segtax != SEGTAX_IAB_AUDIENCE_1_1 and self.segtax < SEGTAX_VENDOR_MIN:
            yield f"segtax: must be 4 or >= 500, got {self.segtax}"
        if self.max_segments < 1:
            yield f"max_segments: must be >= 1, got {self.max_segments}"
        if not self.user_id_sources:
            yield "user_id_sources: must not be empty"
        for i, source in enumerate(self.user_id_sources):
            if (msg := _one_of(source, USER_ID_SOURCES)) is not None:
                yield f"user_id_sources[{i}]: {msg}"
            elif source in self.user_id_sources[:i]:
                yield f"user_id_sources[{i}]: duplicate {source!r}"
        if "eids" in self.user_id_sources and not self.eids_sources:
            yield "eids_sources: must not be empty when user_id_sources includes 'eids'"
        for i, domain in enumerate(self.eids_sources):
            if not domain:
                yield f"eids_sources[{i}]: must not be empty"
        if self.sync_url:
            parts = urlsplit(self.sync_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                yield f"sync_url: must be an http(s) URL, got {self.sync_url!r}"
            if UID_MACRO not in self.sync_url:
                yield f"sync_url: must contain the {UID_MACRO} macro for our cookie id"

    def accepts_key(self, key: str) -> bool:
        """Whether `key` is this partner's API key, compared in constant time."""
        return hmac.compare_digest(hash_api_key(key), self.api_key_sha256)

    def mapped(self, segment_ids: Iterable[str]) -> set[str]:
        """The partner's ids for the granted subset of `segment_ids`, uncapped (exports)."""
        return {
            self.segment_id_map.get(s, s) for s in self.granted_segments.intersection(segment_ids)
        }

    def view(self, segment_ids: Iterable[str], *, distinct: bool = False) -> list[str]:
        """The partner's ids for the granted subset of `segment_ids`.

        Sorted by our id so answers are stable across calls, then capped at `max_segments`.
        Two of our segments mapped to one partner id are sent once. ``distinct``: the
        caller's ids have no repeats (a segment source's answer), so none are dropped here;
        an id repeated anyway would be sent twice.
        """
        # Places are ints: sorting them is the sort by our id, without comparing strings,
        # and every loop runs in C, an ungranted id mapped to one place past all the others
        # (this method was over half of a batch lookup's CPU: decision 0013).
        places = map(self._view_places.get, segment_ids, repeat(_UNGRANTED))
        found = sorted(places if distinct else set(places))
        del found[bisect_left(found, _UNGRANTED) :]
        ids = self._view_ids
        if self._view_distinct:
            return [ids[n] for n in found[: self.max_segments]]
        result: list[str] = []
        sent: set[str] = set()
        for n in found:
            theirs = ids[n]
            if theirs in sent:
                continue
            sent.add(theirs)
            result.append(theirs)
            if len(result) == self.max_segments:
                break
        return result


class PartnerProfiles(Mapping[str, PartnerProfile]):
    """Profiles by partner id, with lookup by presented API key."""

    __slots__ = ("_by_bidder", "_by_id", "_by_key_hash")

    def __init__(self, profiles: Iterable[PartnerProfile]) -> None:
        self._by_id: dict[str, PartnerProfile] = {}
        self._by_key_hash: dict[str, PartnerProfile] = {}
        self._by_bidder: dict[str, PartnerProfile] = {}
        for profile in profiles:
            if profile.prebid_bidder:
                if profile.prebid_bidder in self._by_bidder:
                    raise ValueError(f"prebid bidder {profile.prebid_bidder!r} named twice")
                self._by_bidder[profile.prebid_bidder] = profile
            if profile.partner_id in self._by_id:
                raise ValueError(f"duplicate partner id {profile.partner_id!r}")
            if profile.api_key_sha256 in self._by_key_hash:
                raise ValueError(f"partner {profile.partner_id!r} reuses another partner's key")
            self._by_id[profile.partner_id] = profile
            self._by_key_hash[profile.api_key_sha256] = profile

    def __getitem__(self, partner_id: str) -> PartnerProfile:
        return self._by_id[partner_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def by_prebid_bidder(self, code: str) -> PartnerProfile | None:
        return self._by_bidder.get(code)

    def by_api_key(self, key: str) -> PartnerProfile | None:
        """The partner owning `key`, or None.

        The dict lookup is on the key's SHA-256, so its timing reveals nothing usable about
        the key itself; the final check is hmac.compare_digest all the same.
        """
        profile = self._by_key_hash.get(hash_api_key(key))
        if profile is None or not profile.accepts_key(key):
            return None
        return profile


_REQUIRED_KEYS: Final = (
    "partner_id",
    "kind",
    "api_key_sha256",
    "granted_segments",
    "output_format",
    "segtax",
    "data_provider_id",
    "data_provider_name",
    "max_segments",
    "user_id_sources",
)
_OPTIONAL_KEYS: Final = (
    "segment_id_map",
    "eids_sources",
    "sync_url",
    "prebid_bidder",
    "destination",
)


def parse_partner_profiles(doc: object, source_name: str) -> PartnerProfiles:
    """Validate a document parsed from YAML, `{"partners": [{...}, ...]}`, into profiles.

    Raises PartnerProfileError listing every problem found, not just the first.
    """
    reader = DocReader()
    found: list[tuple[int, PartnerProfile]] = []
    top = reader.mapping(doc, "<document>")
    if top is not None:
        reader.check_keys(top, "", ["partners"])
        partners = top.get("partners", [])
        if not isinstance(partners, list):
            reader.fail("partners", f"must be a list, got {describe(partners)}")
            partners = []
        for index, item in enumerate(partners):
            profile = _read_partner(reader, item, f"partners[{index}]")
            if profile is not None:
                found.append((index, profile))
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    seen_bidders: dict[str, int] = {}
    for index, profile in found:
        code = profile.prebid_bidder
        if code and (first := seen_bidders.setdefault(code, index)) != index:
            reader.fail(f"partners[{index}].prebid_bidder", f"same bidder as partners[{first}]")
        if (first := seen_ids.setdefault(profile.partner_id, index)) != index:
            reader.fail(f"partners[{index}].partner_id", f"duplicate of partners[{first}]")
        if (first := seen_keys.setdefault(profile.api_key_sha256, index)) != index:
            reader.fail(f"partners[{index}].api_key_sha256", f"same key as partners[{first}]")
    if reader.errors:
        raise PartnerProfileError(reader.errors, source_name)
    return PartnerProfiles(profile for _, profile in found)


def _read_partner(reader: DocReader, item: object, path: str) -> PartnerProfile | None:
    doc = reader.mapping(item, path)
    if doc is None:
        return None
    errors_before = len(reader.errors)
    reader.check_keys(doc, path, _REQUIRED_KEYS, _OPTIONAL_KEYS)
    partner_id = reader.string(doc, "partner_id", path)
    kind = reader.string(doc, "kind", path)
    api_key_sha256 = reader.string(doc, "api_key_sha256", path)
    granted = reader.strings(doc, "granted_segments", path)
    segment_id_map = reader.string_map(doc, "segment_id_map", path)
    output_format = reader.string(doc, "output_format", path)
    segtax = reader.integer(doc, "segtax", path)
    provider_id = reader.string(doc, "data_provider_id", path)
    provider_name = reader.string(doc, "data_provider_name", path)
    max_segments = reader.integer(doc, "max_segments", path)
    sources = reader.strings(doc, "user_id_sources", path)
    eids_sources = reader.strings(doc, "eids_sources", path)
    sync_url = reader.string(doc, "sync_url", path)
    prebid_bidder = reader.string(doc, "prebid_bidder", path)
    destination = None
    if "destination" in doc:
        destination = read_destination(reader, doc["destination"], f"{path}.destination")
    if len(reader.errors) > errors_before:
        return None
    try:
        # The casts only narrow str to the Literal types; __post_init__ checks the values.
        return PartnerProfile(
            partner_id=partner_id,
            kind=cast(Kind, kind),
            # Stored hashes are compared as text, so one spelling: lowercase.
            api_key_sha256=api_key_sha256.lower(),
            granted_segments=frozenset(granted),
            segment_id_map=segment_id_map,
            output_format=cast(OutputFormat, output_format),
            segtax=segtax,
            data_provider_id=provider_id,
            data_provider_name=provider_name,
            max_segments=max_segments,
            user_id_sources=cast(tuple[UserIdSource, ...], sources),
            eids_sources=eids_sources,
            sync_url=sync_url,
            prebid_bidder=prebid_bidder,
            destination=destination,
        )
    except PartnerProfileError as exc:
        reader.errors.extend(f"{path}.{message}" for message in exc.messages)
        return None
