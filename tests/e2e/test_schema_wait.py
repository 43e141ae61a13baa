"""A worker never applies commands against a schema older than its release's.

At start, a worker whose database is not yet at its revision answers pings (it is ready)
but takes nothing off ``calls.commands`` until migrate has run. A command that meets a
table or column the database does not have waits, as for a database that is away, and is
never rejected as bad input.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import head_revision, schema_behind, upgrade
from calls_worker.client import CallsClient
from tests.db_world import Db
from tests.e2e.conftest import own_worker, redis_database, scrape, wait_until

pytestmark = pytest.mark.slow

WAIT = 8  # seconds a held command must stay queued: the probe looks every 5 s


def queued(broker: str) -> int:
    return int(redis.Redis.from_url(broker).llen("calls.commands"))


@contextmanager
def world(database_url: str, redis_url: str, number: int, revision: str) -> Iterator[World]:
    """The schema at ``revision``, an organization and a person, a Redis of its own."""
    broker = redis_database(redis_url, number)
    redis.Redis.from_url(broker).flushdb()
    engine = build_engine(database_url, pool_size=1)
    try:
        upgrade(engine, revision)
        db = Db(engine)
        organization = db.organization(3)
        yield World(broker, engine, db, {"personUuid": str(db.person(organization)),
                                         "organizationUuid": str(organization)})  # fmt: skip
    finally:
        engine.dispose()


@dataclass(frozen=True)
class World:
    broker: str
    engine: Engine
    db: Db
    create: dict[str, str]


def test_a_worker_waits_for_migrate_before_taking_commands(
    empty_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    previous = str(int(head_revision() or "0") - 1).zfill(4)  # the release before this one's
    with world(empty_database_url, redis_url, 14, previous) as w:
        assert schema_behind(w.engine) is not None
        worker = own_worker(empty_database_url, w.broker, tmp_path, "held")  # answers a ping
        try:
            with CallsClient(w.broker) as client:
                sent = client.send("create", w.create)
                time.sleep(WAIT)
                assert queued(w.broker) == 1, worker.output()[-3000:]
                assert "takes no commands off calls.commands until migrate" in worker.output()
                port = int(worker.env["CALLS_WORKER_METRICS_PORT"])
                paused = {reason: ("calls_worker_commands_paused", (("reason", reason),))
                          for reason in ("schema", "database")}  # fmt: skip
                shown = scrape(port)  # a paused worker does not look idle: it says why
                assert shown[("calls_worker_commands_consumed", ())] == 0
                assert (shown[paused["schema"]], shown[paused["database"]]) == (1, 0)
                upgrade(w.engine)
                outcome: Any = sent.outcome(60)
            assert outcome["ok"] is True, outcome
            assert scrape(port)[paused["schema"]] == 0
            assert w.db.sql("SELECT count(*) FROM worker_rejected_commands").scalar() == 0
        finally:
            worker.stop()


def test_a_command_meeting_an_unknown_column_waits_and_is_not_rejected(
    empty_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with world(empty_database_url, redis_url, 15, "head") as w:
        worker = own_worker(empty_database_url, w.broker, tmp_path, "unknown-column",
                            CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="2")  # fmt: skip
        try:
            rename(w.engine, "external_metadata", "external_metadata_")  # unknown to it
            with CallsClient(w.broker) as client:
                sent = client.send("create", w.create)
                wait_until(lambda: "external_metadata" in worker.output(), 30,
                           "the command to meet the unknown column")  # fmt: skip
                time.sleep(WAIT)
                rejected = w.db.sql("SELECT count(*) FROM worker_rejected_commands").scalar()
                assert rejected == 0, worker.output()[-3000:]
                assert w.db.sql("SELECT count(*) FROM calls").scalar() == 0
                rename(w.engine, "external_metadata_", "external_metadata")
                outcome: Any = sent.outcome(60)
            assert outcome["ok"] is True, outcome
            assert w.db.sql("SELECT count(*) FROM calls").scalar() == 1
        finally:
            worker.stop()


def rename(engine: Engine, column: str, to: str) -> None:
    with engine.begin() as connection:
        connection.execute(text(f"ALTER TABLE calls RENAME COLUMN {column} TO {to}"))
