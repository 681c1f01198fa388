"""Only the C extensions; everything else about the package is in pyproject.toml.

- segment_rules._fastmatch: the compiled all-hits path of rule matching
  (segment_rules/fast_match.py, docs/decisions/0011). Without it the generated Python
  matcher answers alone, slower.
- segment_rules._kernel: a cookie history's record, prune and evaluate (segment_rules/compiler.py,
  docs/decisions/0015). Without it compiler.py's Python does the same, slower.
- dmp._answers: the lookup's cache-miss path (dmp/answer_build.py, docs/decisions/0012) and
  the replica load's counting sort (docs/decisions/0014).
  Without it dmp/replica.py's Python answers alone, slower.
- dmp._events: the valid event's path of dmp/events.py's decode_event (docs/decisions/0015).
  Without it the Python checks decide alone, slower.
- dmp._states: cookie states as compact bytes (dmp/state_codec.py, docs/decisions/0019).
  Without it the Python writes and reads the same bytes, slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("segment_rules._fastmatch", ["segment_rules/_fastmatch.c"]),
        # No fused multiply-add: decaying scores must round exactly as compiler.py's Python.
        Extension(
            "segment_rules._kernel",
            ["segment_rules/_kernel.c"],
            extra_compile_args=["-ffp-contract=off"],
        ),
        Extension("dmp._answers", ["dmp/_answers.c"]),
        Extension("dmp._events", ["dmp/_events.c"]),
        Extension("dmp._states", ["dmp/_states.c"]),
    ]
)
