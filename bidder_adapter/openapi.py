"""The OpenAPI 3.1 document of the lookup service, served at GET /openapi.json.

Written by hand, next to the handlers it describes; tests/bidder_adapter/test_openapi.py
checks it against the OpenAPI schema and that every route of the app is in it.
"""

from __future__ import annotations

from typing import Any

from dmp.auth_admin_routes import openapi_paths as admin_paths
from dmp.privacy_routes import openapi_paths as privacy_paths

JSON = "application/json"
PARTNER_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed request.",
        401: "Missing or unknown API key.",
        403: "Not allowed for this partner.",
        404: "No such partner, or not configured for this.",
        413: "Batch too large.",
        422: "The partner file was refused; the running version stays.",
        503: "A dependency (Redis) is unavailable.",
    }
    return {str(c): _json_body(_ref("Error"), text[c]) for c in codes}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


PRIVACY_PARAMS = [
    _query("gdpr", "1 when GDPR applies, 0 when not, absent when unknown."),
    _query("gdpr_consent", "TCF v2 consent string; required for a sync when gdpr=1."),
    _query("gpp", "Global Privacy Platform string."),
    _query("gpp_sid", "Comma-separated GPP section ids in force (2 = EU TCF v2)."),
]


def _schemas() -> dict[str, Any]:
    data_object = {
        "type": "object",
        "description": "OpenRTB 2.x Data object carrying our segments in the partner's ids.",
        "required": ["id", "name", "segment", "ext"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "segment": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id"],
                    "properties": {"id": {"type": "string"}},
                },
            },
            "ext": {
                "type": "object",
                "required": ["segtax"],
                "properties": {
                    "segtax": {
                        "type": "integer",
                        "description": "4 = IAB Audience Taxonomy 1.1; 500 and up: vendor.",
                    }
                },
            },
        },
    }
    user_data = {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"data": {"type": "array", "items": _ref("DataObject")}},
            }
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "DataObject": data_object,
        "UserData": user_data,
        "LookupAnswer": {
            "type": "object",
            "description": "`segments` (+`segtax`) for output_format ids; `data` for openrtb.",
            "required": ["id"],
            "properties": {
                "id": {"type": "string"},
                "id_type": {"type": "string", "enum": ["cookie", "buyeruid"]},
                "segments": {"type": "array", "items": {"type": "string"}},
                "segtax": {"type": "integer"},
                "data": {"type": "array", "items": _ref("DataObject")},
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["users"],
            "properties": {
                "users": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id"],
                        "properties": {
                            "id": {"type": "string"},
                            "id_type": {
                                "type": "string",
                                "enum": ["cookie", "buyeruid"],
                                "default": "cookie",
                            },
                        },
                    },
                }
            },
        },
        "BatchAnswer": {
            "type": "object",
            "required": ["users"],
            "properties": {"users": {"type": "array", "items": _ref("LookupAnswer")}},
        },
        "BidRequest": {
            "type": "object",
            "description": "An OpenRTB 2.5 or 2.6 BidRequest; every field is passed through.",
            "additionalProperties": True,
        },
        "RtdRequest": {
            "type": "object",
            "properties": {
                "ortb2": {
                    "type": "object",
                    "description": "The auction's global ortb2 (user ids, regs, consent).",
                    "additionalProperties": True,
                },
                "bidders": {"type": "array", "items": {"type": "string"}},
            },
        },
        "RtdAnswer": {
            "type": "object",
            "required": ["ortb2Fragments"],
            "properties": {
                "ortb2Fragments": {
                    "type": "object",
                    "required": ["global", "bidder"],
                    "properties": {
                        "global": _ref("UserData"),
                        "bidder": {"type": "object", "additionalProperties": _ref("UserData")},
                    },
                }
            },
        },
        "ReloadAnswer": {
            "type": "object",
            "required": ["version", "changed", "partners"],
            "properties": {
                "version": {"type": "string"},
                "changed": {"type": "boolean"},
                "partners": {"type": "integer"},
                "errors": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


def _partner_paths() -> dict[str, Any]:
    version_header = {
        "X-Partner-Config-Version": {
            "description": "The partner configuration version that answered.",
            "schema": {"type": "string"},
        }
    }
    return {
        "/v1/partner/users/{user_id}/segments": {
            "get": {
                "summary": "One user's segments in the partner's view",
                "description": "Only granted segments, in the partner's ids, capped at its maximum.",
                "security": PARTNER_AUTH,
                "parameters": [
                    _path_param("user_id", "Our cookie id, or the partner's id (id_type)."),
                    _query(
                        "id_type",
                        "cookie (default) or buyeruid (the partner's id, via the match table).",
                        {"type": "string", "enum": ["cookie", "buyeruid"], "default": "cookie"},
                    ),
                ],
                "responses": {
                    "200": {
                        **_json_body(_ref("LookupAnswer"), "The partner's view of the user."),
                        "headers": version_header,
                    },
                    **_errors(400, 401, 403),
                },
            }
        },
        "/v1/partner/segments/batch": {
            "post": {
                "summary": "Many users' segments in the partner's view",
                "security": PARTNER_AUTH,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("BatchRequest")}},
                },
                "responses": {
                    "200": _json_body(_ref("BatchAnswer"), "One answer per user, in order."),
                    **_errors(400, 401, 403, 413),
                },
            }
        },
        "/v1/openrtb/enrich": {
            "post": {
                "summary": "Add our Data object to an OpenRTB 2.5/2.6 BidRequest",
                "description": (
                    "Finds the user by user.id, user.buyeruid (match table) or user.eids / "
                    "user.ext.eids, in the partner's order of id sources. mode=full returns the "
                    "request with our item appended to user.data and every other field as sent; "
                    "mode=fragment returns only {user: {data: [..]}} or {}. Nothing is added when "
                    "GDPR applies without consent, or when tmax is below the configured minimum "
                    "(answered at once). X-Dmp-Outcome says which."
                ),
                "security": PARTNER_AUTH,
                "parameters": [
                    _query(
                        "mode",
                        "full (default) or fragment.",
                        {"type": "string", "enum": ["full", "fragment"], "default": "full"},
                    ),
                    _query(
                        "uid",
                        "Our cookie id, when the caller keeps the match table itself; "
                        "used if the partner's id sources include cookie.",
                    ),
                ],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("BidRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "The enriched request, or the fragment.",
                        "headers": {
                            **version_header,
                            "X-Dmp-Outcome": {
                                "description": "enriched, tmax, gdpr, no_user or no_segments.",
                                "schema": {"type": "string"},
                            },
                        },
                        "content": {
                            JSON: {"schema": {"oneOf": [_ref("BidRequest"), _ref("UserData")]}}
                        },
                    },
                    **_errors(400, 401),
                },
            }
        },
        "/v1/prebid/rtd": {
            "post": {
                "summary": "Prebid real-time-data answer (ortb2Fragments)",
                "description": (
                    "global: the caller's view; bidder: each requested bidder code's own view "
                    "(partners with that prebid_bidder). Our first-party cookie is read too."
                ),
                "security": PARTNER_AUTH,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("RtdRequest")}},
                },
                "responses": {
                    "200": _json_body(_ref("RtdAnswer"), "Fragments to mergeDeep as they are."),
                    **_errors(400, 401),
                },
            }
        },
    }


def _sync_paths() -> dict[str, Any]:
    partner = _path_param("partner_id", "The partner's id from the partner file.")
    cookie = {"Set-Cookie": {"description": "Our first-party id.", "schema": {"type": "string"}}}
    return {
        "/v1/sync/{partner_id}/setuid": {
            "get": {
                "summary": "Sync pixel, partner-initiated: store their id for our cookie",
                "parameters": [
                    partner,
                    {**_query("uid", "The partner's user id."), "required": True},
                    *PRIVACY_PARAMS,
                ],
                "responses": {
                    "200": {
                        "description": "Stored; a 1x1 GIF.",
                        "headers": cookie,
                        "content": {
                            "image/gif": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    "204": {
                        "description": "No consent where GDPR applies: nothing read or stored."
                    },
                    **_errors(400, 404, 503),
                },
            }
        },
        "/v1/sync/{partner_id}/redirect": {
            "get": {
                "summary": "Sync pixel, ours: redirect to the partner with our cookie id",
                "parameters": [partner, *PRIVACY_PARAMS],
                "responses": {
                    "302": {
                        "description": "To the partner's sync_url, ${UID} replaced.",
                        "headers": {
                            **cookie,
                            "Location": {"description": "Target.", "schema": {"type": "string"}},
                        },
                    },
                    "204": {"description": "No consent where GDPR applies: nothing read or set."},
                    **_errors(404),
                },
            }
        },
    }


def _service_paths() -> dict[str, Any]:
    return {
        "/v1/users/{uid}/segments": {
            "get": {
                "summary": "All of a cookie's segments (internal, unfiltered)",
                "parameters": [_path_param("uid", "Our cookie id.")],
                "responses": {
                    "200": _json_body(
                        {
                            "type": "object",
                            "properties": {
                                "uid": {"type": "string"},
                                "segments": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "Segment ids, composites included.",
                    ),
                    **_errors(400),
                },
            }
        },
        "/v1/admin/partners/reload": {
            "post": {
                "summary": "Reload the partner file now",
                "security": [{"bearer": []}],
                "responses": {
                    "200": _json_body(_ref("ReloadAnswer"), "The version in force."),
                    **_errors(401, 403, 422),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Up."}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness",
                "responses": {
                    "200": {"description": "Replica loaded and following."},
                    "503": {"description": "Loading, or degraded (Redis unreachable)."},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json_body({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "DMP lookup service",
            "version": "1",
            "description": "Segment answers at bid time, partner views, OpenRTB enrichment, ID sync.",
        },
        "paths": {
            **_partner_paths(),
            **_sync_paths(),
            **_service_paths(),
            **privacy_paths(),
            **admin_paths(),
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Partner API key."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
    }
