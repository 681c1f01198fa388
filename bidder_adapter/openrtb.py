"""OpenRTB 2.5/2.6 bid requests: read user ids and consent, write our `user.data` item.

Reading is tolerant: requests come from many exchanges, so a missing or oddly typed part
is skipped, never an exception. Writing touches only `user.data` and leaves every item
written by others exactly as it came (irregular ones included, e.g. `segtax: "4"`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from bidder_adapter import jsonio
from bidder_adapter.profiles import PartnerProfile
from dmp.consent import ConsentStringError, decode_tc_string

Mode = Literal["full", "fragment"]
DataObject = dict[str, object]


@dataclass(frozen=True, slots=True)
class UserIds:
    """The ids a request carries for its user; eids as (source, uid) pairs in request order."""

    user_id: str | None = None
    buyeruid: str | None = None
    eids: tuple[tuple[str, str], ...] = ()


def _get(parent: object, key: str) -> object:
    return parent.get(key) if isinstance(parent, Mapping) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _eid_pairs(eids: object) -> Iterator[tuple[str, str]]:
    if not isinstance(eids, list):
        return
    for eid in eids:
        source = _text(_get(eid, "source"))
        uids = _get(eid, "uids")
        if source is None or not isinstance(uids, list):
            continue
        for uid in uids:
            if (value := _text(_get(uid, "id"))) is not None:
                yield source, value


def find_user_ids(request: object) -> UserIds:
    """user.id, user.buyeruid and the eids of a request; never raises.

    eids are read from both `user.eids` (2.6) and `user.ext.eids` (2.5), because requests
    in transition carry either or both; duplicates are dropped, first occurrence kept.
    """
    user = _get(request, "user")
    pairs = [*_eid_pairs(_get(user, "eids")), *_eid_pairs(_get(_get(user, "ext"), "eids"))]
    return UserIds(
        user_id=_text(_get(user, "id")),
        buyeruid=_text(_get(user, "buyeruid")),
        eids=tuple(dict.fromkeys(pairs)),
    )


def _gdpr_applies(regs: object) -> bool:
    # 2.6 moved the flag from regs.ext.gdpr to regs.gdpr; the 2.6 field wins when present.
    flag = _get(regs, "gdpr")
    if flag is None:
        flag = _get(_get(regs, "ext"), "gdpr")
    # Omitted means unknown, which OpenRTB leaves to us, and 0 means no. 1 means yes, and so
    # does any other value: an unreadable flag must not unlock data that 1 would protect.
    return not (flag is None or flag == 0 or flag == "0")


def _consent_string(user: object) -> str | None:
    consent = _text(_get(user, "consent"))
    return consent if consent is not None else _text(_get(_get(user, "ext"), "consent"))


def gdpr_applies_without_consent(request: object) -> bool:
    """True when the request says GDPR applies (2.6 `regs.gdpr`, 2.5 `regs.ext.gdpr`)
    and carries no usable consent string (2.6 `user.consent`, 2.5 `user.ext.consent`).
    """
    if not _gdpr_applies(_get(request, "regs")):
        return False
    return not has_consent(_consent_string(_get(request, "user")))


# A TCF v2 TC string is base64url segments joined by dots. The core segment opens with
# the 6-bit version, 2, which base64url spells "C", and its fixed fields plus the empty
# vendor sections take 259 bits, so at least 44 characters.
# TCF purposes that targeting by segments needs: 1 store/access information on a device,
# 3 create a personalised ads profile, 4 select personalised ads. Same default as ingest
# (DMP_PRIVACY_CONSENT_PURPOSES).
DEFAULT_PURPOSES: Final = frozenset({1, 3, 4})


def has_consent(
    consent_string: str | None, purposes: frozenset[int] = DEFAULT_PURPOSES, vendor_id: int = 0
) -> bool:
    """Whether a TCF v2 TC string consents to every purpose in ``purposes`` (and the vendor).

    The core segment is decoded (dmp.consent); an unreadable or refusing string is no consent.
    """
    if not consent_string:
        return False
    try:
        decoded = decode_tc_string(consent_string)
    except ConsentStringError:
        return False
    if not purposes <= decoded.purpose_consents:
        return False
    return not vendor_id or vendor_id in decoded.vendor_consents


def build_data_object(profile: PartnerProfile, partner_segment_ids: Sequence[str]) -> DataObject:
    """Our OpenRTB Data object carrying `partner_segment_ids` (already in the partner's ids).

    Raises ValueError when there are no ids: an empty item says nothing, so callers pass
    None to enrich_request instead.
    """
    if not partner_segment_ids:
        raise ValueError("no segment ids: pass data=None rather than an empty Data object")
    return {
        "id": profile.data_provider_id,
        "name": profile.data_provider_name,
        "segment": [{"id": segment_id} for segment_id in partner_segment_ids],
        # int(): readers such as Prebid Server's Rubicon adapter drop "4" (a string).
        "ext": {"segtax": int(profile.segtax)},
    }


def _append_data(request: object, ours: DataObject) -> bool:
    """Append `ours` to request.user.data in place; False when the shape forbids it."""
    if not isinstance(request, dict):
        return False
    if "user" not in request:
        request["user"] = {"data": [ours]}
        return True
    user = request["user"]
    # A `user` or `user.data` of another type (null included) is someone else's mistake
    # that we neither repair nor overwrite: we add nothing rather than guess their intent.
    if not isinstance(user, dict):
        return False
    if "data" not in user:
        user["data"] = [ours]
        return True
    items = user["data"]
    if not isinstance(items, list):
        return False
    items.append(ours)
    return True


def enrich_request(request_bytes: bytes, data: Mapping[str, object] | None, mode: Mode) -> bytes:
    """Add our Data object to a bid request.

    "full": the whole request with `data` appended to `user.data` (both created when
    absent); every other value and all key order preserved. Unchanged input bytes when
    `data` is None or `user`/`user.data` has a type we cannot append to. Raises ValueError
    when the request has to be changed but is not valid JSON.
    "fragment": only `{"user": {"data": [data]}}` for the caller to merge, or `{}` when
    `data` is None; the request is not read.
    """
    if mode == "fragment":
        return b"{}" if data is None else jsonio.dumps({"user": {"data": [dict(data)]}})
    if mode != "full":
        raise ValueError(f"mode must be 'full' or 'fragment', got {mode!r}")
    if data is None:
        return request_bytes
    return enrich_parsed(jsonio.loads(request_bytes), request_bytes, data)


def enrich_parsed(request: object, request_bytes: bytes, data: Mapping[str, object]) -> bytes:
    """Full mode for a request already parsed from `request_bytes` with jsonio.loads.

    Saves a second parse when the caller had to read the request anyway (to find the user);
    `request` is changed in place.
    """
    if not _append_data(request, dict(data)):
        return request_bytes
    return jsonio.dumps(request)
