"""Shared test helpers: a valid profile, the shared OpenRTB fixtures, and undoing our append."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson

from bidder_adapter.profiles import PartnerProfile, hash_api_key

# tests/bidder_adapter/support.py -> parents[3] is the folder holding the repo and shared/.
OPENRTB_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "openrtb"

API_KEY = "k-acme-0123456789"

PROFILE = PartnerProfile(
    partner_id="acme-dsp",
    kind="dsp",
    api_key_sha256=hash_api_key(API_KEY),
    granted_segments=frozenset({"806", "807", "1", "55"}),
    segment_id_map={"806": "acme-new-vehicles"},
    output_format="openrtb",
    segtax=4,
    data_provider_id="dmp.example",
    data_provider_name="Example DMP",
    max_segments=3,
    user_id_sources=("cookie", "buyeruid", "eids"),
    eids_sources=("dmp.example",),
)

OURS: dict[str, object] = {
    "id": "dmp.example",
    "name": "Example DMP",
    "segment": [{"id": "acme-new-vehicles"}, {"id": "807"}],
    "ext": {"segtax": 4},
}


def fixture_paths() -> list[Path]:
    return sorted(OPENRTB_DIR.rglob("*.json"))


def fixture_id(path: Path) -> str:
    return path.relative_to(OPENRTB_DIR).as_posix()


def request_bytes(path: Path) -> bytes:
    """The bid request in a fixture file; Prebid Server test files nest it in mockBidRequest."""
    doc = orjson.loads(path.read_bytes())
    if isinstance(doc, dict) and "mockBidRequest" in doc:
        return orjson.dumps(doc["mockBidRequest"])
    return path.read_bytes()


def strip_ours(enriched: Any, original: Any, ours: object) -> Any:
    """`enriched` with our appended item removed (and whatever we created just to hold it).

    Asserts the item is there, last, unchanged; the caller compares the rest with `original`.
    """
    result = copy.deepcopy(enriched)
    if "user" not in original:
        assert result["user"] == {"data": [ours]}
        del result["user"]
    elif "data" not in original["user"]:
        assert result["user"]["data"] == [ours]
        del result["user"]["data"]
    else:
        assert result["user"]["data"][-1] == ours
        result["user"]["data"].pop()
    return result
