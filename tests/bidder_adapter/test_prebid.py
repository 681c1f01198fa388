from __future__ import annotations

import pytest

from bidder_adapter.prebid import build_rtd_answer
from tests.bidder_adapter.support import OURS

OTHER: dict[str, object] = {"id": "dmp.example", "name": "Example DMP", "segment": [{"id": "9"}]}


def test_global_and_per_bidder_fragments() -> None:
    answer = build_rtd_answer(OURS, {"appnexus": OTHER, "rubicon": OURS})
    assert answer == {
        "ortb2Fragments": {
            "global": {"user": {"data": [OURS]}},
            "bidder": {
                "appnexus": {"user": {"data": [OTHER]}},
                "rubicon": {"user": {"data": [OURS]}},
            },
        }
    }


def test_empty_answer_keeps_both_keys() -> None:
    assert build_rtd_answer(None, {}) == {"ortb2Fragments": {"global": {}, "bidder": {}}}


def test_bidders_without_data_are_left_out() -> None:
    answer = build_rtd_answer(None, {"appnexus": None, "rubicon": OTHER})
    assert answer["ortb2Fragments"] == {
        "global": {},
        "bidder": {"rubicon": {"user": {"data": [OTHER]}}},
    }


def test_answer_does_not_alias_caller_data() -> None:
    data = dict(OTHER)
    answer = build_rtd_answer(data, {})
    data["name"] = "changed"
    assert answer["ortb2Fragments"] == {"global": {"user": {"data": [OTHER]}}, "bidder": {}}


def test_empty_bidder_code_is_refused() -> None:
    with pytest.raises(ValueError, match="bidder codes"):
        build_rtd_answer(None, {"": OTHER})
