"""The Prometheus config, rules and alert unit tests pass promtool; every alert is covered.

promtool comes from the Debian package prometheus; when it is missing these tests fail
(never skip) and say how to install it.
"""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmp.metrics import IngestMetrics, LookupMetrics
from tests.conftest import REPO
from tests.ops.conftest import INSTALL_HINT, PROMETHEUS_DIR, _tool

RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
RUNBOOKS = REPO / "docs" / "runbooks"
RUNBOOK_SECTIONS = ("## What it means", "## How to check", "## How to fix")


def promtool_run(promtool: Path, *args: str | Path, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        [promtool, *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
        cwd=PROMETHEUS_DIR,
    )
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{out}"
    return out


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in load(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_config_is_valid_and_loads_every_rule_file(promtool: Path) -> None:
    promtool_run(promtool, "check", "config", "prometheus.yml")
    listed = sorted(load(PROMETHEUS_DIR / "prometheus.yml")["rule_files"])
    assert listed == sorted(f"rules/{p.name}" for p in RULE_FILES)


def test_rules_are_valid(promtool: Path) -> None:
    out = promtool_run(promtool, "check", "rules", *RULE_FILES)
    assert out.count("SUCCESS") == len(RULE_FILES)


def test_alert_unit_tests_pass(promtool: Path) -> None:
    out = promtool_run(promtool, "test", "rules", *TEST_FILES)
    assert out.count("SUCCESS") == len(TEST_FILES)


def test_promtool_unit_tests_can_fail(promtool: Path, tmp_path: Path) -> None:
    """A wrong expectation must make `promtool test rules` fail, or the test above is void."""
    wrong = load(PROMETHEUS_DIR / "tests" / "alerts.test.yml")
    wrong["rule_files"] = [
        str(PROMETHEUS_DIR / "rules" / Path(f).name) for f in wrong["rule_files"]
    ]
    case = next(
        t
        for t in wrong["tests"]
        if any(c["alertname"] == "DMPTargetDown" for c in t["alert_rule_test"])
    )
    for check in case["alert_rule_test"]:
        check["exp_alerts"] = []  # the down target does fire: this expectation is false
    path = tmp_path / "wrong.test.yml"
    path.write_text(yaml.safe_dump(wrong))
    proc = subprocess.run(
        [promtool, "test", "rules", path], capture_output=True, timeout=300, check=False
    )
    assert proc.returncode != 0
    assert b"DMPTargetDown" in proc.stdout + proc.stderr


def test_every_alert_has_severity_and_a_runbook_that_exists() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) >= 15
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket", "warning"), name
        assert rule["annotations"]["runbook_url"] == f"docs/runbooks/{name}.md"
        assert rule["annotations"]["summary"], name
        text = (RUNBOOKS / f"{name}.md").read_text()
        assert text.startswith(f"# {name}\n"), name
        for section in RUNBOOK_SECTIONS:
            assert section in text, f"{name}.md lacks {section!r}"
    written = {p.stem for p in RUNBOOKS.glob("DMP*.md")}
    assert written == {r["alert"] for r in rules}, "a runbook without an alert, or the reverse"


def test_every_alert_is_tested_firing_and_silent() -> None:
    """Each alert (each severity of a burn-rate pair) fires in some test and is silent in some."""
    fires: dict[str, set[str]] = defaultdict(set)
    silent: set[str] = set()
    for path in TEST_FILES:
        doc = load(path)
        assert {Path(f).name for f in doc["rule_files"]} == {p.name for p in RULE_FILES}
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                expected = check.get("exp_alerts") or []
                if not expected:
                    silent.add(check["alertname"])
                for alert in expected:
                    fires[check["alertname"]].add(alert["exp_labels"]["severity"])
    wanted: dict[str, set[str]] = defaultdict(set)
    for rule in alert_rules():
        wanted[rule["alert"]].add(rule["labels"]["severity"])
    for name, severities in wanted.items():
        assert fires[name] >= severities, f"{name}: no test where {severities} fire"
        assert name in silent, f"{name}: no test where it must stay silent"


@pytest.mark.parametrize("metrics_class", [IngestMetrics, LookupMetrics])
def test_exposition_passes_promtool_lint(
    promtool: Path, metrics_class: type[IngestMetrics] | type[LookupMetrics]
) -> None:
    metrics = metrics_class.create()
    metrics.set_rule_set("ab" * 32)
    if isinstance(metrics, LookupMetrics):
        metrics.request_seconds.labels("/v1/users/{uid}/segments", "200", "none").observe(0.001)
        metrics.segment_members.set("geo_socal", 3)
    else:
        metrics.consumer_lag.labels("0").set(3)
    out = promtool_run(promtool, "check", "metrics", stdin=metrics.render())
    assert out.strip() == "", out


def test_missing_tool_fails_with_the_install_step() -> None:
    with pytest.raises(pytest.fail.Exception, match=re.escape("deploy/prometheus.sh install")):
        _tool("promtool-that-is-not-installed")
    assert "deploy/prometheus.sh install" in INSTALL_HINT
