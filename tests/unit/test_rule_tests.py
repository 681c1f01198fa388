from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

EXAMPLE_CASES = REPO / "segment_rules" / "examples" / "tests" / "segments_test.yaml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmp.cli", "rules", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_example_cases_pass() -> None:
    done = run("test", str(EXAMPLE_CASES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASS") == 3


def test_a_wrong_expectation_fails_with_file_line_and_reason(tmp_path: Path) -> None:
    cases = tmp_path / "wrong_test.yaml"
    rules = REPO / "segment_rules" / "examples" / "segments.yaml"
    cases.write_text(
        f"rules: {rules}\n"
        "cases:\n"
        "  - name: one view claimed as intent\n"
        "    events:\n"
        "      - {uid: c, ts: -1h, type: page_view, categories: [auto/new-cars]}\n"
        "    expect:\n"
        "      - {uid: c, at: 0, in: [auto_new_car_intent]}\n"
        "      - {uid: c, at: 0, in: [no_such_segment]}\n"
    )
    done = run("test", str(cases))
    assert done.returncode == 1
    assert "FAIL  one view claimed as intent" in done.stdout
    assert f"{cases}:7: c should be in auto_new_car_intent at +0s; is in []" in done.stdout
    assert f"{cases}:8: unknown segment 'no_such_segment'" in done.stdout


def test_bad_time_is_refused_with_position(tmp_path: Path) -> None:
    cases = tmp_path / "bad_test.yaml"
    rules = REPO / "segment_rules" / "examples" / "segments.yaml"
    cases.write_text(
        f"rules: {rules}\ncases:\n  - events:\n      - {{uid: c, ts: yesterday, type: click}}\n"
    )
    done = run("test", str(cases))
    assert done.returncode == 1
    assert f"{cases}:4:" in done.stderr
    assert "a time is 0, '-3d' or '+12h'" in done.stderr
