"""Under CI a configured but unreachable server fails the tests needing it; elsewhere they skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/nothing"


@pytest.mark.parametrize(("ci", "verdict"), [("true", "1 error"), ("", "1 skipped")])
def test_unreachable_database(ci: str, verdict: str) -> None:
    env = {**os.environ, "CI": ci, "CALLS_WORKER_TEST_DATABASE_URL": CLOSED_PORT_URL}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/integration/test_schema.py::test_a_plain_sql_attempt_is_counted"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verdict in run.stdout, run.stdout
    assert (run.returncode != 0) is bool(ci)
    if ci:
        assert "fails instead of skipping" in run.stdout
