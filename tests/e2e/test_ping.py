"""The probe the container orchestrator runs against a worker."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Process, worker_env

# Each test on the session's worker runs on Redis and on RabbitMQ (tests/e2e/conftest.py).
pytestmark = pytest.mark.brokers("redis", "rabbitmq")


def ping(env: dict[str, str], hostname: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calls_worker", "ping", "-n", hostname, "--timeout", "2", *extra],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_ping_answers_for_a_running_worker_only(
    worker: Process, database_url: str, broker_url: str, tmp_path: Path
) -> None:
    env = worker_env(database_url, broker_url, tmp_path)
    answered = ping(env, f"e2e@{socket.gethostname()}", "--database")  # the session worker
    assert answered.returncode == 0, answered.stderr
    missing = ping(env, "nobody@nowhere")
    assert missing.returncode != 0
    assert "did not answer" in missing.stderr
