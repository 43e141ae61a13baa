"""The tests' container engine and the image under test, once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import unreachable
from tests.containers.engine import Engine, EngineUnavailable, calls_worker_image, started_engine
from tests.e2e.conftest import rabbitmq_url, redis_url  # noqa: F401 - the servers' fixtures


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    try:
        with started_engine() as started:
            yield started
    except EngineUnavailable as reason:
        unreachable(f"no container engine: {reason}")


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    """deploy/Dockerfile, built here on the local Python base."""
    return calls_worker_image(engine)
