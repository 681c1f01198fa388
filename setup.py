"""Only the C extension; everything else about the package is in pyproject.toml.

segment_rules._fastmatch is the compiled all-hits path of rule matching
(segment_rules/fast_match.py, docs/decisions/0011). Without it the generated Python
matcher answers alone, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("segment_rules._fastmatch", ["segment_rules/_fastmatch.c"])])
