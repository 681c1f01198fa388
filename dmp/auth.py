"""Who may call what on the lookup app: the admin key, partner keys, open lookups.

Keys are only ever held as SHA-256 digests (the partner file's `api_key_sha256`,
DMP_PARTNER_ADMIN_KEY_SHA256) and compared in constant time; docs/security.md says how to
rotate them.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from bidder_adapter.partner_registry import PartnerRegistry
from bidder_adapter.profiles import PartnerProfile, hash_api_key
from dmp.config import Settings
from dmp.limits import limit_error, presented_key

ADMIN = "admin"


def admin_refusal(request: web.Request, settings: Settings) -> web.Response | None:
    """None when the request carries the admin key; else the JSON error to answer with."""
    wanted = settings.partner.admin_key_sha256.lower()
    if not wanted:
        return limit_error(403, "admin API disabled: set DMP_PARTNER_ADMIN_KEY_SHA256")
    key = presented_key(request)
    if key is None or not hmac.compare_digest(hash_api_key(key), wanted):
        return limit_error(
            401, "missing or wrong admin key", {"WWW-Authenticate": 'Bearer realm="dmp-admin"'}
        )
    return None


def lookup_caller(
    request: web.Request, settings: Settings, partners: PartnerRegistry | None
) -> tuple[str | None, PartnerProfile | None]:
    """For GET /v1/users/{uid}/segments: ("admin" | "partner" | "open", profile), or
    (None, None) when DMP_SECURITY_LOOKUP_AUTH=key and no valid key came.

    ``partners``: the app's registry, or None without partner routes."""
    if settings.security.lookup_auth != "key":
        return "open", None
    key = presented_key(request)
    if key is None:
        return None, None
    wanted = settings.partner.admin_key_sha256.lower()
    if wanted and hmac.compare_digest(hash_api_key(key), wanted):
        return ADMIN, None
    if partners is not None:
        profile = partners.current.profiles.by_api_key(key)
        if profile is not None:
            return "partner", profile
    return None, None
