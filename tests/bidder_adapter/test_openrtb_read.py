from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from bidder_adapter.openrtb import UserIds, find_user_ids, gdpr_applies_without_consent, has_consent
from tests.bidder_adapter.support import OPENRTB_DIR, fixture_id, fixture_paths
from tests.integration.tcf_encoder import encode_tc_string

# A real TCF v2 string (IAB example: CMP 27, vendor list 15). It consents to purposes 1-3
# only, so not to all of ours (1, 3, 4): no consent for segment targeting.
IAB_EXAMPLE = "COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA"
# Consent to purposes 1-10 and vendors 8 and 755, encoded by the tests' TCF encoder.
TCF_CORE = encode_tc_string(purposes=range(1, 11), vendors=(8, 755))
TCF_TWO_SEGMENTS = (
    TCF_CORE
    + ".IFoEUQQgAIQwgIwQABAEAAAAOIAACAIAAAAQAIAgEAACEAAAAAgAQBAAAAAAAGBAAgAAAAAAAFAAECAAAgA"
    "AQARAEQAAAAAJAAIAAgAAAYQEAAAQmAgBC3ZAYzUw"
)


def test_user_id_and_buyeruid() -> None:
    ids = find_user_ids({"user": {"id": "u-1", "buyeruid": "b-1"}})
    assert ids == UserIds(user_id="u-1", buyeruid="b-1", eids=())


def test_eids_openrtb_2_6() -> None:
    request = {
        "user": {
            "eids": [
                {"source": "dmp.example", "uids": [{"id": "x1", "atype": 1}, {"id": "x2"}]},
                {"source": "id5-sync.com", "uids": [{"id": "y1", "atype": 1}]},
            ]
        }
    }
    assert find_user_ids(request).eids == (
        ("dmp.example", "x1"),
        ("dmp.example", "x2"),
        ("id5-sync.com", "y1"),
    )


def test_eids_openrtb_2_5_ext() -> None:
    request = {"user": {"ext": {"eids": [{"source": "dmp.example", "uids": [{"id": "x1"}]}]}}}
    assert find_user_ids(request).eids == (("dmp.example", "x1"),)


def test_eids_from_both_places_are_merged_without_duplicates() -> None:
    eid = {"source": "dmp.example", "uids": [{"id": "x1"}]}
    other = {"source": "other.example", "uids": [{"id": "z"}]}
    request = {"user": {"eids": [eid], "ext": {"eids": [eid, other]}}}
    assert find_user_ids(request).eids == (("dmp.example", "x1"), ("other.example", "z"))


def test_malformed_parts_are_skipped() -> None:
    request = {
        "user": {
            "id": 123,
            "buyeruid": "",
            "eids": [
                "junk",
                {"source": "", "uids": [{"id": "a"}]},
                {"source": "s1", "uids": {"id": "not-a-list"}},
                {"source": "s2", "uids": [None, {"id": 5}, {"id": ""}, {"atype": 1}, {"id": "ok"}]},
                {"uids": [{"id": "no-source"}]},
            ],
            "ext": {"eids": "nope"},
        }
    }
    assert find_user_ids(request) == UserIds(user_id=None, buyeruid=None, eids=(("s2", "ok"),))


@pytest.mark.parametrize(
    "request_doc",
    [None, 7, "x", [], {}, {"user": None}, {"user": []}, {"user": {"ext": None}}, {"user": "u"}],
)
def test_odd_requests_never_raise(request_doc: object) -> None:
    assert find_user_ids(request_doc) == UserIds()


@pytest.mark.parametrize("path", fixture_paths(), ids=fixture_id)
def test_fixtures_read_without_error(path: Path) -> None:
    doc = orjson.loads(path.read_bytes())
    request = doc.get("mockBidRequest", doc)
    ids = find_user_ids(request)
    assert ids.eids == ()
    assert not gdpr_applies_without_consent(request)


def test_fixture_ids_match_the_document() -> None:
    doc = orjson.loads((OPENRTB_DIR / "bsm" / "breq.banner.json").read_bytes())
    assert find_user_ids(doc) == UserIds(
        user_id="45asdf987656789adfad4678rew656789", buyeruid="5df678asd8987656asdf78987654"
    )


def gdpr_request(regs: dict[str, Any] | None, user: dict[str, Any] | None) -> dict[str, Any]:
    request: dict[str, Any] = {"id": "r"}
    if regs is not None:
        request["regs"] = regs
    if user is not None:
        request["user"] = user
    return request


@pytest.mark.parametrize(
    ("regs", "user", "expected"),
    [
        pytest.param(None, None, False, id="no-regs"),
        pytest.param({"gdpr": 0}, None, False, id="2.6-gdpr-0"),
        pytest.param({"ext": {"gdpr": 0}}, None, False, id="2.5-gdpr-0"),
        pytest.param({"gdpr": 1}, None, True, id="2.6-no-user"),
        pytest.param({"gdpr": 1}, {"consent": ""}, True, id="2.6-empty-consent"),
        pytest.param({"gdpr": 1}, {"consent": TCF_CORE}, False, id="2.6-consent"),
        pytest.param({"gdpr": 1}, {"consent": IAB_EXAMPLE}, True, id="2.6-not-our-purposes"),
        pytest.param({"ext": {"gdpr": 1}}, {"ext": {}}, True, id="2.5-no-consent"),
        pytest.param({"ext": {"gdpr": 1}}, {"ext": {"consent": ""}}, True, id="2.5-empty"),
        pytest.param({"ext": {"gdpr": 1}}, {"ext": {"consent": TCF_CORE}}, False, id="2.5-ok"),
        pytest.param(
            {"gdpr": 1}, {"consent": "", "ext": {"consent": TCF_CORE}}, False, id="2.6-flag-2.5-str"
        ),
        pytest.param({"ext": {"gdpr": 1}}, {"consent": TCF_CORE}, False, id="2.5-flag-2.6-str"),
        pytest.param({"gdpr": 1}, {"consent": "yes please"}, True, id="not-a-tc-string"),
        pytest.param({"gdpr": 0, "ext": {"gdpr": 1}}, None, False, id="2.6-flag-wins"),
        pytest.param({"gdpr": None, "ext": {"gdpr": 1}}, None, True, id="null-2.6-flag"),
        pytest.param({"gdpr": "1"}, None, True, id="string-1"),
        pytest.param({"gdpr": "0"}, None, False, id="string-0"),
        pytest.param({"gdpr": "maybe"}, None, True, id="unreadable-flag-fails-closed"),
        pytest.param("regs", None, False, id="regs-not-object"),
    ],
)
def test_gdpr_applies_without_consent(
    regs: Any, user: dict[str, Any] | None, expected: bool
) -> None:
    assert gdpr_applies_without_consent(gdpr_request(regs, user)) is expected


@pytest.mark.parametrize(
    ("consent", "expected"),
    [
        (TCF_CORE, True),
        (TCF_TWO_SEGMENTS, True),
        (encode_tc_string(purposes=(1, 3, 4)), True),  # exactly ours
        (encode_tc_string(purposes=(1, 3)), False),  # no "select personalised ads"
        (encode_tc_string(purposes=()), False),  # refused everything
        (IAB_EXAMPLE, False),  # a real string consenting to purposes 1-3 only
        (None, False),
        ("", False),
        ("C", False),  # right version, far too short for a core segment
        ("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA", False),  # TCF v1, retired
        ("yes please", False),
    ],
)
def test_has_consent_decodes_the_purposes(consent: str | None, expected: bool) -> None:
    assert has_consent(consent) is expected


def test_has_consent_checks_our_vendor_when_configured() -> None:
    assert has_consent(TCF_CORE, vendor_id=755)
    assert not has_consent(TCF_CORE, vendor_id=756)
