from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import cast

import orjson
import pytest

from bidder_adapter.openrtb import Mode, build_data_object, enrich_request
from tests.bidder_adapter.support import (
    OPENRTB_DIR,
    OURS,
    PROFILE,
    fixture_id,
    fixture_paths,
    request_bytes,
    strip_ours,
)


def test_all_shared_fixtures_are_found() -> None:
    # Guards the parametrized tests below against silently running on nothing.
    assert len(fixture_paths()) == 16


def test_build_data_object() -> None:
    assert build_data_object(PROFILE, ["acme-new-vehicles", "807"]) == OURS
    vendor = dataclasses.replace(PROFILE, segtax=600)
    data = build_data_object(vendor, ["x"])
    assert data["ext"] == {"segtax": 600}
    assert type(cast(dict[str, object], data["ext"])["segtax"]) is int


def test_build_data_object_refuses_no_segments() -> None:
    with pytest.raises(ValueError, match="data=None"):
        build_data_object(PROFILE, [])


@pytest.mark.parametrize("path", fixture_paths(), ids=fixture_id)
def test_fixture_full_mode_appends_ours_and_keeps_the_rest(path: Path) -> None:
    raw = request_bytes(path)
    original = orjson.loads(raw)
    enriched = orjson.loads(enrich_request(raw, OURS, "full"))
    last = enriched["user"]["data"][-1]
    assert last == OURS
    assert type(last["ext"]["segtax"]) is int
    assert last["ext"]["segtax"] == 4
    stripped = strip_ours(enriched, original, OURS)
    assert stripped == original
    # == ignores key order; equal serializations mean the order was kept at every level.
    assert orjson.dumps(stripped) == orjson.dumps(original)


@pytest.mark.parametrize("path", fixture_paths(), ids=fixture_id)
def test_fixture_fragment_mode_is_only_ours(path: Path) -> None:
    out = enrich_request(request_bytes(path), OURS, "fragment")
    assert orjson.loads(out) == {"user": {"data": [OURS]}}


@pytest.mark.parametrize("path", fixture_paths(), ids=fixture_id)
def test_fixture_without_data_is_unchanged(path: Path) -> None:
    raw = request_bytes(path)
    assert enrich_request(raw, None, "full") == raw
    assert enrich_request(raw, None, "fragment") == b"{}"


def test_irregular_data_items_are_kept_as_they_were() -> None:
    raw = request_bytes(OPENRTB_DIR / "prebid-server" / "rubicon-user-fpd.json")
    items = orjson.loads(enrich_request(raw, OURS, "full"))["user"]["data"]
    assert [item["ext"]["segtax"] for item in items] == [4, "someValue", "4", 4, [4], 4]
    assert items[:-1] == orjson.loads(raw)["user"]["data"]


def test_data_items_without_segment_are_kept() -> None:
    raw = request_bytes(OPENRTB_DIR / "mxmcherry-2.6" / "expandable-creative.json")
    before = orjson.loads(raw)["user"]["data"]
    assert any("segment" not in item for item in before)
    after = orjson.loads(enrich_request(raw, OURS, "full"))["user"]["data"]
    assert after == [*before, OURS]


@pytest.mark.parametrize(
    ("request_doc", "expected"),
    [
        ({"id": "r"}, {"id": "r", "user": {"data": [OURS]}}),
        ({"id": "r", "user": {"id": "u"}}, {"id": "r", "user": {"id": "u", "data": [OURS]}}),
        ({"user": {"data": []}, "at": 1}, {"user": {"data": [OURS]}, "at": 1}),
    ],
)
def test_user_and_data_are_created_when_absent(
    request_doc: dict[str, object], expected: dict[str, object]
) -> None:
    out = enrich_request(orjson.dumps(request_doc), OURS, "full")
    assert out == orjson.dumps(expected)  # byte equality: created keys go last


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user": null}',
        b'{"user": "u-1"}',
        b'{"user": {"data": null}}',
        b'{"user": {"data": {"id": "6"}}}',
        b'{"user": {"data": "x"}}',
        b"[1, 2]",
        b'"just a string"',
    ],
)
def test_shapes_we_cannot_append_to_are_returned_unchanged(raw: bytes) -> None:
    assert enrich_request(raw, OURS, "full") == raw


def test_numbers_round_trip() -> None:
    raw = (
        b'{"id":"r","imp":[{"bidfloor":0.5,"w":1.0,"h":1E2,"x":-0.0,"tiny":1e-7,"huge":1.5e300,'
        b'"lat":47.627500}],"ints":[9223372036854775807,18446744073709551615,'
        b"-9223372036854775808,18446744073709551616,123456789012345678901234567890,"
        b'-99999999999999999999],"user":{"data":[]}}'
    )
    out = enrich_request(raw, OURS, "full")
    # The standard library parses every integer exactly, so it is the referee here.
    before, after = json.loads(raw), json.loads(out)
    assert after["imp"] == before["imp"]
    assert after["ints"] == before["ints"]
    assert [type(v) for v in after["imp"][0].values()] == [float] * 7
    assert all(type(v) is int for v in after["ints"])
    assert after["ints"][4] == 123456789012345678901234567890


def test_long_digit_runs_in_strings_take_the_exact_path_harmlessly() -> None:
    raw = b'{"id":"12345678901234567890","user":{"buyeruid":"00000000000000000000000"}}'
    out = orjson.loads(enrich_request(raw, OURS, "full"))
    assert out == {
        "id": "12345678901234567890",
        "user": {"buyeruid": "00000000000000000000000", "data": [OURS]},
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b'{"a": NaN}',
        b'{"a": NaN, "b": 12345678901234567890123}',
        b'{"a": 1e400}',
        b'{"a": 1e400, "b": 12345678901234567890123}',
        b'{"a": 1e400, "b": "12345678901234567890123"}',
        b'{"a": -1e400, "b": "12345678901234567890123"}',
        b'{"a": "\\ud800"}',
        b'{"a": "\\ud800", "b": 12345678901234567890123}',
        b'{"a": "\xff"}',
        b'{"a": "\xff", "b": 12345678901234567890123}',
    ],
)
def test_invalid_json_raises_value_error_in_full_mode(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the type is the contract, messages vary
        enrich_request(raw, OURS, "full")


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        enrich_request(b"{}", OURS, cast(Mode, "partial"))


def test_caller_data_is_not_mutated_or_aliased() -> None:
    ours = dict(OURS)
    out = enrich_request(b'{"user":{"data":[]}}', ours, "full")
    assert ours == OURS
    assert orjson.loads(out)["user"]["data"] == [OURS]
