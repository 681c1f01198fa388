from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bidder_adapter.profiles import (
    PartnerProfile,
    PartnerProfileError,
    PartnerProfiles,
    hash_api_key,
    parse_partner_profiles,
)
from tests.bidder_adapter.support import API_KEY, PROFILE

KEY_A = hash_api_key("key-a")
KEY_B = hash_api_key("key-b")

VALID_YAML = f"""
partners:
  - partner_id: acme-dsp
    kind: dsp
    api_key_sha256: {KEY_A.upper()}
    granted_segments: ["806", "807"]
    segment_id_map: {{"806": acme-806}}
    output_format: openrtb
    segtax: 4
    data_provider_id: dmp.example
    data_provider_name: Example DMP
    max_segments: 50
    user_id_sources: [buyeruid, eids]
    eids_sources: [dmp.example]
  - partner_id: beta-ssp
    kind: ssp
    api_key_sha256: {KEY_B}
    granted_segments: ["1"]
    output_format: ids
    segtax: 600
    data_provider_id: dmp.example
    data_provider_name: Example DMP
    max_segments: 1
    user_id_sources: [cookie]
"""


def valid_doc() -> dict[str, Any]:
    doc = yaml.safe_load(VALID_YAML)
    assert isinstance(doc, dict)
    return doc


def errors_for(doc: object) -> list[str]:
    with pytest.raises(PartnerProfileError) as info:
        parse_partner_profiles(doc, "partners.yaml")
    assert info.value.source_name == "partners.yaml"
    assert str(info.value).startswith("partners.yaml: ")
    return info.value.messages


def test_valid_document_parses() -> None:
    profiles = parse_partner_profiles(valid_doc(), "partners.yaml")
    assert list(profiles) == ["acme-dsp", "beta-ssp"]
    acme = profiles["acme-dsp"]
    assert acme.kind == "dsp"
    assert acme.api_key_sha256 == KEY_A  # stored lowercase whatever the YAML spelling
    assert acme.segment_id_map == {"806": "acme-806"}
    assert acme.user_id_sources == ("buyeruid", "eids")
    assert profiles["beta-ssp"].segment_id_map == {}
    assert profiles["beta-ssp"].eids_sources == ()
    assert profiles["beta-ssp"].segtax == 600


def test_lookup_by_api_key() -> None:
    profiles = parse_partner_profiles(valid_doc(), "partners.yaml")
    assert profiles.by_api_key("key-a") is profiles["acme-dsp"]
    assert profiles.by_api_key("key-b") is profiles["beta-ssp"]
    assert profiles.by_api_key("key-c") is None
    assert profiles.by_api_key("") is None
    assert profiles.by_api_key("\ud800") is None  # a lone surrogate must not raise


def test_accepts_key() -> None:
    assert PROFILE.accepts_key(API_KEY)
    assert not PROFILE.accepts_key(API_KEY + "x")
    assert not PROFILE.accepts_key(PROFILE.api_key_sha256)  # the hash is not the key


def test_segment_id_map_is_read_only_copy() -> None:
    source = {"806": "a"}
    profile = dataclasses.replace(PROFILE, segment_id_map=source)
    source["806"] = "changed"
    assert profile.segment_id_map == {"806": "a"}
    with pytest.raises(TypeError):
        profile.segment_id_map["806"] = "x"  # type: ignore[index]  # proving it is read-only
    assert hash(profile) == hash(dataclasses.replace(profile))


@pytest.mark.parametrize(
    ("segtax", "ok"), [(4, True), (500, True), (9999, True), (3, False), (1, False), (499, False)]
)
def test_segtax_range(segtax: int, ok: bool) -> None:
    doc = valid_doc()
    doc["partners"][1]["segtax"] = segtax
    if ok:
        assert parse_partner_profiles(doc, "partners.yaml")["beta-ssp"].segtax == segtax
    else:
        assert errors_for(doc) == [f"partners[1].segtax: must be 4 or >= 500, got {segtax}"]


def test_value_errors_name_their_paths() -> None:
    doc = valid_doc()
    acme = doc["partners"][0]
    acme["kind"] = "exchange"
    acme["api_key_sha256"] = "abc"
    acme["segment_id_map"] = {"806": "", "999": "x"}
    acme["output_format"] = "xml"
    acme["max_segments"] = 0
    acme["user_id_sources"] = ["eids", "fax", "eids"]
    acme["eids_sources"] = []
    acme["partner_id"] = ""
    assert errors_for(doc) == [
        "partners[0].partner_id: must not be empty",
        "partners[0].kind: must be one of 'dsp', 'ssp', got 'exchange'",
        "partners[0].api_key_sha256: must be 64 lowercase hex characters (SHA-256 of the key)",
        "partners[0].segment_id_map.806: must not be empty",
        "partners[0].segment_id_map.999: not in granted_segments",
        "partners[0].output_format: must be one of 'openrtb', 'ids', got 'xml'",
        "partners[0].max_segments: must be >= 1, got 0",
        "partners[0].user_id_sources[1]: must be one of 'cookie', 'buyeruid', 'eids', got 'fax'",
        "partners[0].user_id_sources[2]: duplicate 'eids'",
        "partners[0].eids_sources: must not be empty when user_id_sources includes 'eids'",
    ]


def test_type_errors_unknown_and_missing_keys() -> None:
    doc = valid_doc()
    acme = doc["partners"][0]
    acme["granted_segments"] = [806, "807", None]
    acme["segtax"] = "4"
    acme["max_segments"] = True
    acme["segment_id_map"] = ["806"]
    acme["colour"] = "red"
    del acme["data_provider_name"]
    doc["partners"][1]["user_id_sources"] = "cookie"
    doc["partners"].append("not a partner")
    doc["version"] = 2
    assert errors_for(doc) == [
        "version: unknown key",
        "partners[0].colour: unknown key",
        "partners[0].data_provider_name: required key is missing",
        "partners[0].granted_segments[0]: must be a string (quote it in YAML), got integer 806",
        "partners[0].granted_segments[2]: must be a string, got null",
        "partners[0].segment_id_map: must be a mapping, got list",
        "partners[0].segtax: must be an integer, got string '4'",
        "partners[0].max_segments: must be an integer, got boolean True",
        "partners[1].user_id_sources: must be a list of strings, got string 'cookie'",
        "partners[2]: must be a mapping, got string 'not a partner'",
    ]


def test_duplicate_partner_ids_and_api_keys() -> None:
    doc = valid_doc()
    twin = copy.deepcopy(doc["partners"][0])
    other = copy.deepcopy(doc["partners"][1])
    other["partner_id"] = "acme-dsp"
    other["api_key_sha256"] = KEY_B.upper()
    doc["partners"] += [twin, other]
    assert errors_for(doc) == [
        "partners[2].partner_id: duplicate of partners[0]",
        "partners[2].api_key_sha256: same key as partners[0]",
        "partners[3].partner_id: duplicate of partners[0]",
        "partners[3].api_key_sha256: same key as partners[1]",
    ]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (None, "<document>: must be a mapping, got null"),
        ({}, "partners: required key is missing"),
        ({"partners": {"a": 1}}, "partners: must be a list, got mapping"),
        ({"partners": [], 1: 2}, "<document>: 1: unknown key"),
    ],
)
def test_document_level_errors(doc: object, message: str) -> None:
    assert errors_for(doc) == [message]


def test_empty_partner_list_is_valid() -> None:
    assert len(parse_partner_profiles({"partners": []}, "partners.yaml")) == 0


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(PartnerProfileError) as info:
        dataclasses.replace(PROFILE, segtax=3, max_segments=-1)
    assert info.value.messages == [
        "segtax: must be 4 or >= 500, got 3",
        "max_segments: must be >= 1, got -1",
    ]


def test_profiles_container_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate partner id"):
        PartnerProfiles([PROFILE, PROFILE])
    other = dataclasses.replace(PROFILE, partner_id="other")
    with pytest.raises(ValueError, match="reuses another partner's key"):
        PartnerProfiles([PROFILE, other])


def test_view_keeps_only_granted_maps_ids_and_sorts_by_our_id() -> None:
    profile = dataclasses.replace(PROFILE, max_segments=10)
    # "999" is not granted; "806" is mapped; order follows our ids as strings.
    assert profile.view(["999", "807", "806", "55", "1"]) == [
        "1",
        "55",
        "acme-new-vehicles",
        "807",
    ]


def test_view_caps_at_max_segments() -> None:
    assert PROFILE.max_segments == 3
    assert PROFILE.view(["807", "806", "55", "1"]) == ["1", "55", "acme-new-vehicles"]


def test_view_deduplicates() -> None:
    profile = dataclasses.replace(
        PROFILE, segment_id_map={"806": "car", "807": "car"}, max_segments=2
    )
    # Both map to "car", which is sent once and counts once towards the cap.
    assert profile.view(["807", "806", "806", "55"]) == ["55", "car"]


def test_view_of_nothing_granted() -> None:
    assert PROFILE.view([]) == []
    assert PROFILE.view(["999"]) == []


def reference_view(profile: PartnerProfile, segment_ids: list[str]) -> list[str]:
    """The view as its docstring says it, plainly: what the precomputed places must equal."""
    result: list[str] = []
    for ours in sorted(profile.granted_segments.intersection(segment_ids)):
        theirs = profile.segment_id_map.get(ours, ours)
        if theirs not in result and len(result) < profile.max_segments:
            result.append(theirs)
    return result


IDS = st.sampled_from([f"{n}" for n in range(12)] + ["a", "B", "z9", "10a"])


@given(
    granted=st.frozensets(IDS, max_size=14),
    mapping=st.dictionaries(IDS, st.sampled_from(["x", "y", "1", "a", "q"]), max_size=6),
    asked=st.lists(IDS, max_size=20),
    cap=st.integers(1, 15),
)
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_view_equals_the_plain_definition(
    granted: frozenset[str], mapping: dict[str, str], asked: list[str], cap: int
) -> None:
    """Random grants, maps that send two of ours to one id (or onto another granted id),
    repeated and ungranted asks, every cap."""
    profile = dataclasses.replace(
        PROFILE,
        granted_segments=granted,
        segment_id_map={k: v for k, v in mapping.items() if k in granted},
        max_segments=cap,
    )
    assert profile.view(asked) == reference_view(profile, asked)
    once = list(dict.fromkeys(asked))  # as a segment source answers: each id once
    assert profile.view(once, distinct=True) == reference_view(profile, once)
