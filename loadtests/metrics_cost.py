"""What one Prometheus scrape of the lookup service costs with 1,000 segments.

    python -m loadtests.metrics_cost [--segments 1000] [--calls 200] [--workers 2]

The lookup answers /metrics on the same event loop as bid requests, so the time to render
the exposition is time those requests wait. Prints the median over ``--calls`` renders, for
one process (in-memory registry) and for ``--workers`` processes sharing files
(PROMETHEUS_MULTIPROC_DIR), where each scrape reads and merges every worker's files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmp.metrics import NO_PARTNER, LookupMetrics, prepare_multiproc_dir

# Routes and statuses a busy replica has seen: the request histogram's label sets.
ENDPOINTS = (
    "/v1/users/{uid}/segments",
    "/v1/partner/users/{user_id}/segments",
    "/v1/partner/segments/batch",
    "/v1/openrtb/enrich",
    "/v1/prebid/rtd",
    "/metrics",
    "/readyz",
)
STATUSES = ("200", "400", "401")


def fill(metrics: LookupMetrics, segments: int) -> None:
    for endpoint in ENDPOINTS:
        for status in STATUSES:
            metrics.request_seconds.labels(endpoint, status, NO_PARTNER).observe(0.0004)
    for n in range(segments):
        metrics.segment_members.set(f"segment_{n:04d}", 1000 + n)
    metrics.set_rule_set("0" * 64)
    metrics.ready.set(1)


def median_ms(metrics: LookupMetrics, calls: int) -> tuple[float, int]:
    times = []
    size = 0
    for _ in range(calls):
        t0 = time.perf_counter()
        size = len(metrics.render())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, size


WORKER = """
import sys
from pathlib import Path
from loadtests.metrics_cost import fill
from dmp.metrics import LookupMetrics
fill(LookupMetrics.create(multiproc_dir=Path(sys.argv[1])), int(sys.argv[2]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    single = LookupMetrics.create()
    fill(single, args.segments)
    ms, size = median_ms(single, args.calls)
    print(f"{'mode':<28}{'median ms':>10}{'bytes':>10}")
    print(f"{'one process':<28}{ms:>10.2f}{size:>10}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare_multiproc_dir(folder)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
        for _ in range(args.workers):
            subprocess.run(
                [sys.executable, "-c", WORKER, str(folder), str(args.segments)],
                env=env,
                check=True,
                timeout=120,
            )
        # Reading needs no multiprocess value store, only the folder; the populations are
        # the scraped worker's own (every worker follows the same streams).
        merged = LookupMetrics.create(multiproc_dir=folder)
        for n in range(args.segments):
            merged.segment_members.set(f"segment_{n:04d}", 1000 + n)
        ms, size = median_ms(merged, args.calls)
        print(f"{f'{args.workers} processes (files)':<28}{ms:>10.2f}{size:>10}")


if __name__ == "__main__":
    main()
