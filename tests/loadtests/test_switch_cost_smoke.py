"""loadtests/switch_cost.py at a tiny size, so it cannot rot (performance is not judged)."""

from __future__ import annotations

import subprocess

import orjson
import pytest

from loadtests.common import REPO, RESULTS, python_argv

pytestmark = pytest.mark.integration


def test_switch_cost_runs_and_reports() -> None:
    # Only the current code: a comparison with an old revision (--old-commit) needs the git
    # history, which a shallow clone has not.
    argv = python_argv("loadtests.switch_cost", "--members", "300", "--others", "100")
    subprocess.run([*argv, "--runs", "1"], cwd=REPO, check=True, capture_output=True, timeout=120)
    doc = orjson.loads((RESULTS / "switch_cost.json").read_bytes())
    assert doc["members"] == 300
    (run,) = doc["runs"]
    assert run["lines"] == 300
    assert run["write_transactions"] == 2  # 300 lines: one transaction, then the switch
