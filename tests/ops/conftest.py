"""Ops tests: promtool, a real Prometheus, and the services' metrics on the real stack.

The real-stack fixtures are the integration tests' own (re-exported, not copied), so these
tests fail, never skip, when Kafka or Redis is not running.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import producer as producer
from tests.integration.conftest import redis_client as redis_client
from tests.integration.conftest import rules as rules
from tests.integration.conftest import settings as settings
from tests.integration.conftest import stack as stack
from tests.integration.conftest import start_ingest as start_ingest

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
INSTALL_HINT = "run `deploy/prometheus.sh install` (Debian package prometheus) first"


def _tool(name: str) -> Path:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return Path(path)


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _tool("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    return _tool("prometheus")
