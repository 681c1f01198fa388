"""A labelled latency histogram for one process, observed with plain arithmetic.

prometheus-client's `Histogram.observe` takes a lock for the sum and for each bucket it
increments, and walks the bucket bounds in Python. On the bid-time lookup that cost about
2.7 us of CPU a request (of ~50; docs/decisions/0009). The lookup runs one event loop per
process, so nothing here needs a lock: a request adds one to one bucket found by bisection
and adds its time to the sum, and a scrape turns the counts into Prometheus' cumulative
buckets. With several worker processes the values must go through prometheus-client's
shared files instead, so `dmp.metrics` uses this only for a single process.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class HistogramChild:
    """One label set's counts: ``counts[i]`` observations fell in bucket ``i`` alone."""

    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, amount: float) -> None:
        # Prometheus buckets are upper bounds, inclusive: the first bound >= amount.
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.total += amount


class LatencyHistogram(Collector):
    """`labels(*values).observe(seconds)`, exposed as a Prometheus histogram."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: bucket bounds must be increasing, got {bounds}")
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = bounds
        # The text prometheus-client writes for a bound, so series keep their "le" labels.
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = HistogramChild(self._bounds)
        return child

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, child in list(self._children.items()):
            running = 0
            buckets = []
            for le, count in zip(self._les, list(child.counts), strict=True):
                running += count
                buckets.append((le, float(running)))
            family.add_metric(list(key), buckets, child.total)
        return [family]
