"""docs/operations.md lists every setting with its current default, and names real files."""

from __future__ import annotations

import re

from dmp.config import Settings, describe
from tests.conftest import REPO
from tests.ops.settings_doc import DOC, TODO, meanings, render

DOCS = (DOC, REPO / "docs" / "slo.md", *sorted((REPO / "docs" / "runbooks").glob("*.md")))


def test_every_setting_is_documented_with_its_default() -> None:
    text = DOC.read_text()
    assert render(text) == text, "settings table out of date: python -m tests.ops.settings_doc"
    documented = meanings(text)
    assert list(documented) == list(describe(Settings()))
    undocumented = [name for name, meaning in documented.items() if meaning == TODO]
    assert undocumented == [], f"write what these settings do in {DOC.name}"


def test_settings_table_tracks_a_new_setting() -> None:
    """The generator adds a row for a setting the doc lacks, marked TODO (which the test
    above refuses)."""
    text = DOC.read_text()
    without = "\n".join(line for line in text.splitlines() if "`DMP_LOOKUP_PORT`" not in line)
    regenerated = render(without)
    assert f"| `DMP_LOOKUP_PORT` | `8080` | {TODO} |" in regenerated


def test_docs_name_files_that_exist() -> None:
    pattern = re.compile(r"`((?:deploy|docs|loadtests|dmp|tests|segment_rules)/[\w./-]+)`")
    for doc in DOCS:
        for path in pattern.findall(doc.read_text()):
            target = path.split()[0].rstrip(".,")
            if "*" in target or "<" in target:
                continue
            assert (REPO / target).exists(), f"{doc.name} names {target}, which does not exist"
