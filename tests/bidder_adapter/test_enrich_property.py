"""Property: enriching then removing our item gives back the request, value for value."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from bidder_adapter import jsonio
from bidder_adapter.openrtb import enrich_request
from tests.bidder_adapter.support import OURS, strip_ours

# Lone surrogates cannot be encoded as UTF-8, so no real request bytes can hold them.
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: covers the integers orjson alone would round to floats
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
# "user" and "data" would rarely come up among random keys, so build those levels on purpose.
users = st.one_of(
    json_values,
    st.dictionaries(text, json_values, max_size=4),
    st.builds(
        lambda rest, data: {**rest, "data": data},
        st.dictionaries(text, json_values, max_size=4),
        st.lists(json_values, max_size=4) | json_values,
    ),
)
requests = st.one_of(
    st.dictionaries(text, json_values, max_size=6),
    st.builds(
        lambda rest, user: {**rest, "user": user},
        st.dictionaries(text, json_values, max_size=6),
        users,
    ),
)


def exact(raw: bytes) -> Any:
    # The standard library keeps every integer exact; it is the referee, not the code under test.
    return json.loads(raw)


def canonical(value: Any) -> str:
    # Key order matters to us and == ignores it; equal canonical text means equal order too.
    return json.dumps(value, ensure_ascii=False)


@given(requests)
def test_enrich_then_strip_gives_back_the_request(request: dict[str, Any]) -> None:
    raw = jsonio.dumps(request)
    out = enrich_request(raw, OURS, "full")
    original = exact(raw)
    user = original.get("user")
    appendable = "user" not in original or (
        isinstance(user, dict) and isinstance(user.get("data", []), list)
    )
    event("appended" if appendable else "left unchanged")
    event("exact path" if jsonio.needs_exact_path(raw) else "orjson path")
    if not appendable:
        assert out == raw
        return
    stripped = strip_ours(exact(out), original, OURS)
    assert stripped == original
    assert canonical(stripped) == canonical(original)


@given(requests)
def test_fragment_mode_ignores_the_request(request: dict[str, Any]) -> None:
    raw = jsonio.dumps(request)
    assert exact(enrich_request(raw, OURS, "fragment")) == {"user": {"data": [OURS]}}
    assert enrich_request(raw, None, "fragment") == b"{}"
    assert enrich_request(raw, None, "full") == raw
