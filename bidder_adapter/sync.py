"""ID sync (cookie sync) rules, pure: consent from the pixel's query, our cookie id, macros.

OpenRTB 2.6 Appendix C: a sync pixel carries `gdpr`, `gdpr_consent` and `gpp` parameters;
"if their sync pixel is fired, the user is in Europe, and consent information is not
provided, the party might elect to simply immediately return 204 No Content and take no
actions". We do exactly that, failing closed on anything unreadable.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote

from bidder_adapter.openrtb import has_consent
from bidder_adapter.profiles import UID_MACRO
from dmp.consent import ConsentStringError, gpp_sections

# GPP section 2 is the EU TCF v2 section: when it is listed, GDPR rules apply.
GPP_SID_TCF_EU_V2: Final = "2"
# A GPP string opens with its header section (type 3, version 1: base64url "DB..."), then
# `~`-separated sections; the shape is checked first, then the header is decoded.
_GPP_SHAPE: Final = re.compile(r"D[A-Za-z0-9_-]{2,}(?:~[A-Za-z0-9_.-]*)*")
# What we mint is 22 base64url characters; we also accept the ids events carry, as long
# as they are safe in a cookie value without quoting.
_COOKIE_ID: Final = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_SID_LIST: Final = re.compile(r"\d+(?:,\d+)*")


def mint_cookie_id() -> str:
    """A new anonymous first-party id: 128 random bits, base64url."""
    return secrets.token_urlsafe(16)


def valid_cookie_id(value: str | None) -> bool:
    return value is not None and _COOKIE_ID.fullmatch(value) is not None


def gdpr_applies(query: Mapping[str, str]) -> bool:
    """Whether the pixel says GDPR applies: `gdpr=1`, or GPP section 2 listed in `gpp_sid`.

    `gdpr` absent or 0 is "no"; any other value, and a `gpp_sid` we cannot read, count as
    "yes" so that an unreadable signal never unlocks what a clear one would protect.
    """
    gdpr = query.get("gdpr", "")
    if gdpr not in ("", "0"):
        return True
    sids = query.get("gpp_sid", "")
    if not sids:
        return False
    if not _SID_LIST.fullmatch(sids):
        return True
    return GPP_SID_TCF_EU_V2 in sids.split(",")


def has_sync_consent(query: Mapping[str, str]) -> bool:
    """True when we may read, set and store ids for this pixel call.

    Where GDPR applies we need a TCF v2 string in `gdpr_consent`, or a GPP string in `gpp`
    whose EU TCF v2 section (id 2), each consenting to our purposes (openrtb.has_consent).
    """
    if not gdpr_applies(query):
        return True
    if has_consent(query.get("gdpr_consent") or None):
        return True
    gpp = query.get("gpp", "")
    if _GPP_SHAPE.fullmatch(gpp) is None:
        return False
    try:
        sections = gpp_sections(gpp)
    except ConsentStringError:
        return False
    tcf_eu = sections.get(int(GPP_SID_TCF_EU_V2))
    return has_consent(tcf_eu)


def fill_sync_url(template: str, cookie_id: str, query: Mapping[str, str]) -> str:
    """The partner's sync URL with our id and the privacy signals put in, URL-encoded."""
    values = {
        UID_MACRO: cookie_id,
        "${GDPR}": query.get("gdpr", ""),
        "${GDPR_CONSENT}": query.get("gdpr_consent", ""),
        "${GPP}": query.get("gpp", ""),
        "${GPP_SID}": query.get("gpp_sid", ""),
    }
    url = template
    for macro, value in values.items():
        url = url.replace(macro, quote(value, safe=""))
    return url


# A transparent 1x1 GIF: what a sync pixel answers when it has nothing else to say.
PIXEL_GIF: Final = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)
