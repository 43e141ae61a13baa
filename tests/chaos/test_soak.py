"""The reduced soak that CI runs: 5 iterations of 300 commands of each fault, the four kills
and outages in their group-commit form (bursts, the fault while batches are held: the
plain forms run the same code with smaller batches); the full soak, every fault 10 × 1,000,
is `python -m tests.chaos`. It fails on any loss, double or other problem the checker
finds, and when a fault hit work in flight in fewer than half its iterations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.soak import failures, soak, summary

ITERATIONS = int(os.environ.get("CALLS_WORKER_SOAK_ITERATIONS", "5"))
COMMANDS = int(os.environ.get("CALLS_WORKER_SOAK_COMMANDS", "300"))
CI_FAULTS = ("batch-main-kill", "batch-pool-kill", "batch-postgres-stop",
             "batch-broker-restart", "sigterm", "two-beats", "clock-jump")  # fmt: skip


@pytest.mark.slow
# An iteration whose worker was killed waits for the visibility timeout and for resends.
@pytest.mark.timeout(900)
# The producer's Redis connections to a server the soak itself stopped or restarted are
# closed by the collector, not by their pool: a warning about the harness, not the worker.
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")  # fmt: skip
@pytest.mark.parametrize("fault", CI_FAULTS)
def test_reduced_soak(fault: str, tmp_path: Path) -> None:
    results = soak(tmp_path, (fault,), ITERATIONS, COMMANDS)
    print(summary(results))
    assert failures(results) == []
