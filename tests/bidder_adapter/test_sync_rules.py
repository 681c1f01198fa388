from __future__ import annotations

import pytest

from bidder_adapter.partner_file import PartnerFileError, parse_partner_bytes
from bidder_adapter.sync import (
    fill_sync_url,
    gdpr_applies,
    has_sync_consent,
    mint_cookie_id,
    valid_cookie_id,
)
from tests.bidder_adapter.partner_yaml import partner_yaml
from tests.bidder_adapter.test_openrtb_read import TCF_CORE
from tests.integration.tcf_encoder import encode_gpp


@pytest.mark.parametrize(
    ("query", "applies"),
    [
        ({}, False),
        ({"gdpr": "0"}, False),
        ({"gdpr": "1"}, True),
        ({"gdpr": "true"}, True),
        ({"gpp_sid": "7,8"}, False),
        ({"gpp_sid": "7,2"}, True),
        ({"gpp_sid": "x"}, True),
        ({"gdpr": "0", "gpp_sid": "2"}, True),
    ],
)
def test_gdpr_applies(query: dict[str, str], applies: bool) -> None:
    assert gdpr_applies(query) is applies


def test_consent_needs_a_tc_or_gpp_string_where_gdpr_applies() -> None:
    assert has_sync_consent({})
    assert not has_sync_consent({"gdpr": "1"})
    assert has_sync_consent({"gdpr": "1", "gdpr_consent": TCF_CORE})
    assert has_sync_consent({"gpp_sid": "2", "gpp": encode_gpp({2: TCF_CORE})})
    # A real GPP example whose EU TCF section consents to no purpose: no consent.
    assert not has_sync_consent(
        {"gpp_sid": "2", "gpp": "DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"}
    )
    assert not has_sync_consent({"gpp_sid": "2", "gpp": "not gpp"})


def test_macros_are_filled_and_url_encoded() -> None:
    url = fill_sync_url(
        "https://p.example/s?u=${UID}&g=${GDPR}&c=${GDPR_CONSENT}&p=${GPP}&s=${GPP_SID}",
        "abc",
        {"gdpr": "1", "gdpr_consent": "a b&c", "gpp_sid": "2,7"},
    )
    assert url == "https://p.example/s?u=abc&g=1&c=a%20b%26c&p=&s=2%2C7"


def test_minted_cookie_ids_are_random_and_valid() -> None:
    ids = {mint_cookie_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 22 and valid_cookie_id(i) for i in ids)
    for bad in (None, "", "a b", "x" * 129, "a;b", "ü"):
        assert not valid_cookie_id(bad)


def test_partner_ids_are_key_and_url_safe_and_bidder_codes_unique() -> None:
    text = partner_yaml().replace("partner_id: acme-dsp", "partner_id: acme/dsp")
    with pytest.raises(PartnerFileError, match=r"partners\[0\].partner_id: use 1 to 64 letters"):
        parse_partner_bytes(text.encode(), "p.yaml")
    text = partner_yaml().replace("prebid_bidder: beta", "prebid_bidder: acme")
    with pytest.raises(PartnerFileError, match=r"partners\[1\].prebid_bidder: same bidder as"):
        parse_partner_bytes(text.encode(), "p.yaml")
