"""The lock-free lookup histogram exposes what prometheus-client's Histogram would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dmp.latency_histogram import LatencyHistogram
from dmp.metrics import LATENCY_BUCKETS

LABELS = ["endpoint", "status", "partner"]
SERIES = [("/v1/users/{uid}/segments", "200", "none"), ("/readyz", "503", "dsp-a")]


def _exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus-client adds a `_created` sample per series; ours does not keep one.
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(SERIES),
            # Bucket bounds themselves included: they are inclusive upper bounds.
            st.one_of(
                st.sampled_from(LATENCY_BUCKETS),
                st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
            ),
        ),
        max_size=60,
    )
)
def test_exposition_equals_prometheus_clients_histogram(
    observations: list[tuple[tuple[str, str, str], float]],
) -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LatencyHistogram("lat_seconds", "Latency.", LABELS, LATENCY_BUCKETS, ours_registry)
    theirs = Histogram(
        "lat_seconds", "Latency.", LABELS, buckets=LATENCY_BUCKETS, registry=theirs_registry
    )
    for labels, seconds in observations:
        ours.labels(*labels).observe(seconds)
        theirs.labels(*labels).observe(seconds)
    assert _exposition(ours_registry) == _exposition(theirs_registry)


def test_one_observation_lands_in_its_inclusive_bucket() -> None:
    registry = CollectorRegistry()
    hist = LatencyHistogram("lat_seconds", "Latency.", ["endpoint"], (0.001, 0.002), registry)
    hist.labels("/x").observe(0.001)
    hist.labels("/x").observe(0.0015)
    hist.labels("/x").observe(3.0)
    value = registry.get_sample_value
    assert value("lat_seconds_bucket", {"endpoint": "/x", "le": "0.001"}) == 1.0
    assert value("lat_seconds_bucket", {"endpoint": "/x", "le": "0.002"}) == 2.0
    assert value("lat_seconds_bucket", {"endpoint": "/x", "le": "+Inf"}) == 3.0
    assert value("lat_seconds_count", {"endpoint": "/x"}) == 3.0
    assert value("lat_seconds_sum", {"endpoint": "/x"}) == pytest.approx(3.0025)


def test_wrong_label_count_and_unsorted_bounds_are_refused() -> None:
    hist = LatencyHistogram("a_seconds", "A.", ["endpoint"], (0.1,), CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        hist.labels("/x", "200")
    with pytest.raises(ValueError, match="increasing"):
        LatencyHistogram("b_seconds", "B.", ["endpoint"], (0.2, 0.1), CollectorRegistry())
