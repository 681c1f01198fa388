"""Cyclic garbage collection settings for the long-running services.

Ingest keeps up to hundreds of thousands of cookie states (dicts and lists) in memory, and
each batch's events survive young collections, so CPython's default thresholds (700, 10, 10)
ran full collections over every cached state again and again: py-spy put `gc_collect_main`
at 28 % of ingest's samples with 1,000 segments (docs/decisions/0006). Freezing what exists
at start-up (modules, settings) and collecting the young generation every 50,000 allocations
instead of 700 took ingest from 50.7K to 70.3K events/s with 100 segments and from 32.5K to
48.2K with 1,000 (medians of 3, loadtests/ingest.py). The lookup, whose answer cache then
held up to 100,000 lists, went from 52.8 to 48.2 us of CPU a request (1M cookies, 1,000
segments, medians of 3; docs/decisions/0007); its cache now gives the collector nothing to
walk (docs/decisions/0012). Reference counting still frees nearly everything at once; only
garbage in cycles waits longer.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
MIDDLE_THRESHOLD = 20
OLD_THRESHOLD = 100


def tune_for_service() -> None:
    """Call once, after imports and before loading rules (a hot reload frees old rules)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)


def collect_after_load() -> None:
    """Call once a service's long-lived data is loaded, before it reports ready.

    Loading leaves cyclic garbage (parsed YAML nodes, buffers of the snapshot reads) in the
    young generation; with the thresholds above the first young collection came only after
    traffic began, walked it all and held the loop ~15-40 ms (a lookup replica at 10M
    cookies, docs/decisions/0012). Not frozen: a later rule swap must still free the old
    rules' cycles.
    """
    gc.collect()
