"""The cluster tests: not part of ``./dev test`` (the root conftest leaves them out unless
``--cluster`` is given); ``./dev test-cluster`` runs them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.report import Report
from tests.e2e.conftest import redis_url  # noqa: F401  (the same Redis fixture)

_REPORT = Report()


@pytest.fixture(scope="session")
def cluster_report() -> Report:
    return _REPORT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT.rows:
        terminalreporter.write_line(_REPORT.markdown())
