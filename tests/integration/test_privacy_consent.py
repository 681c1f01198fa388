"""TCF v2 and GPP decoding, and the consent policy (pure: no services needed).

The fixed strings below were also decoded by the `iab-tcf` package (0.2.2) during
development, which agreed on purposes, vendors and times for them and for 3,000 random
strings of tests/integration/tcf_encoder.py (bit field and range encodings). It is not a
dependency: it installs a top-level `tests` package (see dmp/consent.py).
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmp.config import PrivacySettings
from dmp.consent import (
    ConsentPolicy,
    ConsentStringError,
    decode_tc_string,
    gpp_sections,
    tc_string_of,
)
from tests.integration.tcf_encoder import encode_gpp, encode_tc_string

# From the GPP specification's examples: a GPP string with one section, tcfeuv2.
GPP_EXAMPLE = "DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"
# Purposes 1, 3, 4 and vendor 755, last updated 2025-11-29 07:06:40 UTC (bit field).
TC_134_755 = (
    "CQbqhMAQbqhMAAfABAENB-EAALAAAAAAAAggF5gAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAgAAAAA"
)
# Purposes 1, 2 and vendors 1, 2, 755 (range encoding).
TC_12_RANGES = "CQbqhMAQbqhMAAfABAENB-EAAMAAAAAAAAggF5wAwAAgACAXmAAAAAA"


def test_fixed_strings() -> None:
    a = decode_tc_string(TC_134_755)
    assert a.purpose_consents == {1, 3, 4}
    assert a.vendor_consents == {755}
    assert a.last_updated == 1_764_400_000.0
    assert a.cmp_id == 31
    b = decode_tc_string(TC_12_RANGES)
    assert b.purpose_consents == {1, 2}
    assert b.vendor_consents == {1, 2, 755}


def test_gpp_example_from_the_spec() -> None:
    sections = gpp_sections(GPP_EXAMPLE)
    assert list(sections) == [2]
    tc = decode_tc_string(sections[2])
    assert (tc.cmp_id, tc.vendor_list_version, tc.purpose_consents) == (31, 126, frozenset())
    assert tc_string_of({"gpp": GPP_EXAMPLE}) == sections[2]


def test_gpp_several_sections() -> None:
    gpp = encode_gpp({2: "TCF", 7: "USNAT", 8: "USCA", 12: "X"})
    assert gpp_sections(gpp) == {2: "TCF", 7: "USNAT", 8: "USCA", 12: "X"}
    assert tc_string_of({"gpp": gpp}) == "TCF"
    assert tc_string_of({"gpp": encode_gpp({7: "USNAT"})}) is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64!",
        "BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA",  # TCF v1
        TC_134_755[:20],  # truncated
        encode_tc_string(purposes=[1], version=3),
    ],
)
def test_unreadable_tc_strings(bad: str) -> None:
    with pytest.raises(ConsentStringError):
        decode_tc_string(bad)


@pytest.mark.parametrize("bad", ["", "CPXx~abc", "DBABMA~a~b", "DBAB"])
def test_unreadable_gpp(bad: str) -> None:
    with pytest.raises(ConsentStringError):
        gpp_sections(bad)


@settings(max_examples=300, deadline=None)
@given(
    purposes=st.sets(st.integers(1, 24)),
    vendors=st.sets(st.integers(1, 5000), max_size=50),
    updated=st.integers(1_500_000_000, 1_900_000_000),
    ranges=st.booleans(),
)
def test_round_trip(purposes: set[int], vendors: set[int], updated: int, ranges: bool) -> None:
    tc = decode_tc_string(
        encode_tc_string(purposes=purposes, vendors=vendors, last_updated=updated, ranges=ranges)
    )
    assert tc.purpose_consents == purposes
    assert tc.vendor_consents == vendors
    assert tc.last_updated == updated


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_text_decodes_or_is_refused(text: str) -> None:
    for decode in (decode_tc_string, gpp_sections):
        with contextlib.suppress(ConsentStringError):
            decode(text)


def policy(**changes: object) -> ConsentPolicy:
    base = {"consent_policy": "when_gdpr_applies", "consent_purposes": "1,3,4", "vendor_id": 0}
    base.update(changes)
    return ConsentPolicy(PrivacySettings(**base))  # type: ignore[arg-type]  # test values


def test_policy_when_gdpr_applies() -> None:
    p = policy()
    good = encode_tc_string(purposes=[1, 3, 4], last_updated=1_700_000_000)
    assert p.verdict({}).usable
    assert p.verdict({"gdpr": 0}).usable
    assert p.verdict({"gdpr": 1}).reason == "no_consent"
    verdict = p.verdict({"gdpr": 1, "consent": good})
    assert verdict.usable
    assert verdict.last_updated == 1_700_000_000
    # A refusal counts even where GDPR is not said to apply.
    assert p.verdict({"consent": encode_tc_string(purposes=[1, 3])}).reason == "purposes"
    assert p.verdict({"consent": "garbage"}).reason == "unreadable"
    assert p.verdict({"gdpr": 1, "gpp": encode_gpp({2: good})}).usable


def test_policy_always_off_and_vendor() -> None:
    assert policy(consent_policy="always").verdict({}).reason == "no_consent"
    assert policy(consent_policy="off").verdict({"gdpr": 1}).usable
    with_vendor = policy(vendor_id=755)
    assert with_vendor.verdict({"consent": TC_134_755}).usable
    assert with_vendor.verdict({"consent": TC_12_RANGES}).reason == "purposes"
    assert (
        with_vendor.verdict({"consent": encode_tc_string(purposes=[1, 3, 4], vendors=[1])}).reason
        == "vendor"
    )


@pytest.mark.parametrize(
    "changes",
    [{"consent_policy": "sometimes"}, {"consent_purposes": "1,x"}, {"consent_purposes": "0,25"}],
)
def test_bad_policy_settings_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="DMP_PRIVACY_CONSENT"):
        policy(**changes)
