"""loadtests/switch_cost.py at a tiny size, so it cannot rot (performance is not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from loadtests.common import RESULTS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_switch_cost_runs_both_versions_and_reports_them() -> None:
    argv = [sys.executable, "-m", "loadtests.switch_cost", "--members", "300", "--others", "100"]
    subprocess.run([*argv, "--runs", "1"], cwd=REPO, check=True, capture_output=True, timeout=120)
    doc = orjson.loads((RESULTS / "switch_cost.json").read_bytes())
    assert doc["members"] == 300
    old, new = doc["runs"]
    assert old["lines"] == new["lines"] == 300
    assert old["write_transactions"] == 1
    assert new["write_transactions"] == 2  # 300 lines: one transaction, then the switch
