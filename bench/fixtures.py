"""A fresh database and a broker for the benchmarks that run the worker."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import text

from bench.common import database_url, server_url
from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import upgrade


@contextmanager
def broker() -> Iterator[str]:
    """CALLS_WORKER_BENCH_REDIS_URL, else an embedded Redis for the run."""
    configured = os.environ.get("CALLS_WORKER_BENCH_REDIS_URL")
    if configured:
        yield configured
        return
    from calls_worker.adapters.embedded import start_redis

    server = start_redis(Path(tempfile.mkdtemp(prefix="bench-redis-")))
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """A migrated, empty database of its own; its URL."""
    with empty_database(name, revision="head") as url:
        yield url


@contextmanager
def empty_database(name: str, revision: str | None = None) -> Iterator[str]:
    """A database of its own, migrated to ``revision`` if one is given; its URL. Dropped
    afterwards."""
    server = server_url()
    admin = build_engine(server, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = database_url(server, name)
    if revision is not None:
        engine = build_engine(url, pool_size=1)
        upgrade(engine, revision)
        engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def seed_person(url: str, max_call_attempts: int | None) -> tuple[UUID, UUID]:
    """An organization with this maximum and a person it owns."""
    organization, person = uuid4(), uuid4()
    engine = build_engine(url, pool_size=1)
    with engine.begin() as connection:
        params: dict[str, Any] = {"o": organization, "p": person, "m": max_call_attempts}
        connection.execute(text("INSERT INTO organizations VALUES (:o, 'bench', :m)"), params)
        connection.execute(text("INSERT INTO persons VALUES (:p, :o)"), params)
    engine.dispose()
    return organization, person
