"""What a partner gets for a user: find our cookie id from the ids it sent, then its view.

No I/O: the segments come from an in-memory replica and buyeruid goes through the
in-memory match table, so the HTTP endpoints and the bidder's embedded mode share this.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from bidder_adapter.openrtb import (
    DataObject,
    UserIds,
    build_data_object,
    find_user_ids,
    gdpr_applies_without_consent,
)
from bidder_adapter.profiles import PartnerProfile, UserIdSource

Outcome = Literal["enriched", "tmax", "gdpr", "no_user", "no_segments"]
IdType = Literal["cookie", "buyeruid"]
ID_TYPES: Final[tuple[IdType, ...]] = ("cookie", "buyeruid")


class SegmentSource(Protocol):
    def segments(self, uid: str) -> list[str]:
        """The cookie's segments, each once."""
        ...


class MatchResolver(Protocol):
    def resolve(self, partner_id: str, partner_uid: str, now: float) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Found:
    """The user we found (our cookie id, and through which of the partner's ids)."""

    cookie_id: str | None = None
    source: UserIdSource | None = None
    segments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    data: DataObject | None = None
    found: Found = Found()


def id_type_allowed(profile: PartnerProfile, id_type: IdType) -> bool:
    """Our cookie id may be asked for by partners that send it (in user.id or eids)."""
    if id_type == "buyeruid":
        return "buyeruid" in profile.user_id_sources
    return "cookie" in profile.user_id_sources or "eids" in profile.user_id_sources


class Answerer:
    def __init__(
        self,
        replica: SegmentSource,
        matches: MatchResolver,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.replica = replica
        self.matches = matches
        self.clock = clock

    def candidates(
        self, profile: PartnerProfile, ids: UserIds, first_party: str | None = None
    ) -> Iterator[tuple[UserIdSource, str]]:
        """Our cookie ids the request points at, in the partner's order of id sources."""
        for source in profile.user_id_sources:
            if source == "cookie":
                if ids.user_id is not None:
                    yield source, ids.user_id
                if first_party is not None:
                    yield source, first_party
            elif source == "buyeruid":
                if ids.buyeruid is not None:
                    cookie = self.matches.resolve(profile.partner_id, ids.buyeruid, self.clock())
                    if cookie is not None:
                        yield source, cookie
            else:
                for eid_source, uid in ids.eids:
                    if eid_source in profile.eids_sources:
                        yield source, uid

    def find(self, profile: PartnerProfile, ids: UserIds, first_party: str | None = None) -> Found:
        """The first candidate we hold segments for; else the first candidate at all."""
        first: Found | None = None
        for source, cookie in self.candidates(profile, ids, first_party):
            segments = self.replica.segments(cookie)
            if segments:
                return Found(cookie, source, tuple(segments))
            if first is None:
                first = Found(cookie, source)
        return first or Found()

    def cookie_for(self, profile: PartnerProfile, user_id: str, id_type: IdType) -> str | None:
        if id_type == "buyeruid":
            return self.matches.resolve(profile.partner_id, user_id, self.clock())
        return user_id

    def view_of(self, profile: PartnerProfile, cookie_id: str | None) -> list[str]:
        """The partner's ids for the user's granted segments (capped, stable order)."""
        if cookie_id is None:
            return []
        return profile.view(self.replica.segments(cookie_id), distinct=True)

    def decide(
        self,
        profile: PartnerProfile,
        request: object,
        *,
        min_tmax_ms: int,
        first_party: str | None = None,
    ) -> Decision:
        """Whether and what to add to a bid request, in the order that costs least first."""
        tmax = request.get("tmax") if isinstance(request, dict) else None
        if isinstance(tmax, int | float) and not isinstance(tmax, bool) and tmax < min_tmax_ms:
            return Decision("tmax")
        if gdpr_applies_without_consent(request):
            return Decision("gdpr")
        found = self.find(profile, find_user_ids(request), first_party)
        if found.cookie_id is None:
            return Decision("no_user", found=found)
        theirs = profile.view(found.segments, distinct=True)
        if not theirs:
            return Decision("no_segments", found=found)
        return Decision("enriched", build_data_object(profile, theirs), found)


def lookup_answer(profile: PartnerProfile, user_id: str, theirs: list[str]) -> dict[str, object]:
    """One user in the partner's output format: ids, or OpenRTB `data` items."""
    if profile.output_format == "ids":
        return {"id": user_id, "segments": theirs, "segtax": int(profile.segtax)}
    data = [build_data_object(profile, theirs)] if theirs else []
    return {"id": user_id, "data": data}
