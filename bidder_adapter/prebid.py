"""The answer a Prebid.js real-time-data (RTD) submodule merges into an auction.

Shape, from the Prebid.js docs "How to Add a Real Time Data Submodule"
(https://docs.prebid.org/dev-docs/add-rtd-submodule.html, source
prebid/prebid.github.io dev-docs/add-rtd-submodule.md, section `reqBidsConfigObj`):
`getBidRequestData(reqBidsConfigObj, callback, config, userConsent)` receives
`reqBidsConfigObj.ortb2Fragments`, an object with two properties: `global` (first-party data
for all bidders, in the OpenRTB shape of `setConfig({ortb2})`) and `bidder` (a map from bidder
code to that bidder's OpenRTB first-party data). Submodules `mergeDeep` their data into both,
e.g. `mergeDeep(reqBidsConfigObj.ortb2Fragments.bidder, {[bidderCode]: data})`.

Our endpoint returns `{"ortb2Fragments": {"global": ..., "bidder": {...}}}` so the browser-side
submodule can merge each half into the matching fragment without reshaping anything.
"""

from __future__ import annotations

from collections.abc import Mapping


def _user_data(data: Mapping[str, object]) -> dict[str, object]:
    return {"user": {"data": [dict(data)]}}


def build_rtd_answer(
    global_data: Mapping[str, object] | None,
    per_bidder: Mapping[str, Mapping[str, object] | None],
) -> dict[str, object]:
    """`{"ortb2Fragments": {"global": {"user": {"data": [..]}}, "bidder": {code: {...}}}}`.

    `global` is `{}` without global data, and bidders whose data is None are left out, so
    the answer always has both keys. Prebid merges a bidder's fragment over the global one,
    and its mergeDeep (Prebid.js src/utils.js) appends array items not already present, so a
    bidder named here also receives the global Data object: put in `global_data` only what
    every bidder may see.
    """
    bidder: dict[str, object] = {}
    for code, data in per_bidder.items():
        if not isinstance(code, str) or not code:
            raise ValueError(f"bidder codes must be non-empty strings, got {code!r}")
        if data is not None:
            bidder[code] = _user_data(data)
    fragments = {"global": {} if global_data is None else _user_data(global_data), "bidder": bidder}
    return {"ortb2Fragments": fragments}
