"""Outcomes in the result backend for a while, in the database for longer: a worker that
keeps them in Redis 2 s, and producers that read them later, or never."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from calls_worker.client import CallsClient
from tests.db_world import Db
from tests.e2e.conftest import (
    Process,
    control_app_for,
    redis_database,
    wait_for_worker,
    wait_until,
    worker_env,
)

RETENTION = 2


@pytest.fixture
def short_memory(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A worker of its own, on a Redis database of its own, keeping outcomes 2 s; its broker."""
    broker = redis_database(redis_url, 12)
    redis.Redis.from_url(broker).flushdb()
    env = worker_env(database_url, broker, tmp_path,
                     CALLS_WORKER_RESULT_RETENTION_SECONDS=str(RETENTION))  # fmt: skip
    worker = Process(["worker", "-c", "2", "-n", "short@%h", "-Q", "calls.commands"], env,
                     tmp_path / "short.log")  # fmt: skip
    control = control_app_for(broker)
    try:
        wait_for_worker(control, "short", worker)
        yield broker
    finally:
        worker.stop()
        control.close()


def person(db: Db) -> dict[str, str]:
    organization = db.organization(3)
    return {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}


@pytest.mark.slow
def test_an_outcome_leaves_redis_at_the_configured_age_and_is_still_found(
    db: Db, short_memory: str
) -> None:
    backend = redis.Redis.from_url(short_memory)
    with CallsClient(short_memory) as client:
        handle = client.send("create", person(db))
        first = handle.outcome(30)
        key = f"celery-task-meta-{handle.command_id}"
        assert 0 < backend.ttl(key) <= RETENTION
        wait_until(lambda: not backend.exists(key), 10, "the outcome to leave Redis")

        later = client.outcome(handle.command_id, timeout=30)  # asks the database

    assert first["ok"] is True
    assert later == first


@pytest.mark.slow
def test_an_ignored_outcome_is_never_in_redis_and_still_found(db: Db, short_memory: str) -> None:
    backend = redis.Redis.from_url(short_memory)
    with CallsClient(short_memory) as client:
        handle = client.send("create", person(db), ignore_result=True)
        outcome = handle.outcome(30)
    assert outcome["ok"] is True
    assert db.sql("SELECT count(*) FROM calls WHERE uuid = :u",
                  u=outcome["call"]["uuid"]).scalar() == 1  # fmt: skip
    assert not backend.exists(f"celery-task-meta-{handle.command_id}")
    assert not [key for key in backend.scan_iter("celery-task-meta-*")
                if handle.command_id.encode() in key]  # fmt: skip


def test_an_operator_reads_an_outcome_from_the_database(
    db: Db, database_url: str, short_memory: str
) -> None:
    with CallsClient(short_memory) as client:
        handle = client.send("create", person(db))
        sent = handle.outcome(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env["CALLS_WORKER_DATABASE_URL"] = database_url

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "calls_worker", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    shown = cli("outcome", handle.command_id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == sent
    missing = cli("outcome", "no-such-command")
    assert missing.returncode == 1
    assert "no outcome for command no-such-command" in missing.stderr
