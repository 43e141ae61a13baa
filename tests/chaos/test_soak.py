"""The reduced soak that CI runs: every fault of the full soak, 3 iterations of 300
commands on Redis and 2 on RabbitMQ (CALLS_WORKER_SOAK_ITERATIONS and _COMMANDS change
them); the full soak, every fault 10 × 1,000, is `python -m tests.chaos`. Each broker's
faults share one scene (a throw-away PostgreSQL and broker, the workers kept while they
live). A fault fails on any problem the checker finds (tests/chaos/checker.py), and when
any of its iterations struck no work in flight."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from tests.chaos.soak import (
    RABBITMQ_FAULTS,
    REDIS_FAULTS,
    Scene,
    broker_of,
    failures,
    scene_for,
    soak_in,
    summary,
)

ITERATIONS = {"redis": 3, "rabbitmq": 2}
COMMANDS = int(os.environ.get("CALLS_WORKER_SOAK_COMMANDS", "300"))


def iterations(kind: str) -> int:
    return int(os.environ.get("CALLS_WORKER_SOAK_ITERATIONS", ITERATIONS[kind]))


@pytest.fixture(scope="module")
def redis_scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    with scene_for(tmp_path_factory.mktemp("soak-redis"), "redis") as scene:
        yield scene


@pytest.fixture(scope="module")
def rabbitmq_scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    with scene_for(tmp_path_factory.mktemp("soak-rabbitmq"), "rabbitmq") as scene:
        yield scene


@pytest.mark.slow
# An iteration whose worker was killed waits for resends; a RabbitMQ node takes seconds.
@pytest.mark.timeout(900)
# The producer's Redis connections to a server the soak itself stopped or restarted are
# closed by the collector, not by their pool: a warning about the harness, not the worker.
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")  # fmt: skip
@pytest.mark.parametrize("fault", REDIS_FAULTS + RABBITMQ_FAULTS)
def test_reduced_soak(fault: str, request: pytest.FixtureRequest) -> None:
    kind = broker_of(fault)
    scene: Scene = request.getfixturevalue(f"{kind}_scene")
    results = soak_in(scene, (fault,), iterations(kind), COMMANDS, random.Random())
    print(summary(results))
    assert results
    assert failures(results, iterations(kind)) == []
