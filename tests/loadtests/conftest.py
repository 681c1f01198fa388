"""Load-test smoke runs use the real stack, like the integration tests (fail, never skip)."""

from __future__ import annotations

from tests.integration.conftest import stack as stack
