"""A worker process killed mid-command, and a warm shutdown: nothing lost, nothing doubled.

Each test starts its own worker, so the session's worker is never the one hurt.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID, uuid4

import psutil
import pytest
import redis
from celery import Celery

from calls_worker.client import CallsClient
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import Process, own_worker, queues_drained, wait_until
from tests.reliability import Reliability, counted

TIMEOUT = 60


@contextmanager
def session_worker_paused(control_app: Celery) -> Iterator[None]:
    """The session's worker stops taking commands, so the test's own worker gets them all."""
    session_worker = [f"e2e@{socket.gethostname()}"]
    control_app.control.cancel_consumer("calls.commands", destination=session_worker, reply=True)
    try:
        yield
    finally:
        control_app.control.add_consumer("calls.commands", destination=session_worker, reply=True)


def pool_processes(worker: Process) -> list[psutil.Process]:
    return psutil.Process(worker.popen.pid).children(recursive=True)


def new_call(db: Db, client: CallsClient, maximum: int = 5) -> str:
    organization = db.organization(maximum)
    person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    return str(client.send("create", person).outcome(TIMEOUT)["call"]["uuid"])


def attempt(call: str) -> dict[str, str]:
    return {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED}


@pytest.mark.scenario("killed-before-commit")
@pytest.mark.slow
def test_killed_before_commit_the_command_is_redelivered_and_applied_once(
    db: Db, worker: Process, client: CallsClient, control_app: Celery, database_url: str,
    redis_url: str, tmp_path: Path, reliability: Reliability,
) -> None:  # fmt: skip
    call = new_call(db, client)
    with session_worker_paused(control_app):
        victim = own_worker(database_url, redis_url, tmp_path, "victim", control_app=control_app)
        try:
            with db.engine.connect() as holder:  # the command will wait on this lock
                holder.exec_driver_sql("SELECT 1 FROM calls WHERE uuid = %s FOR UPDATE", (call,))
                handle = client.send("add_attempt", attempt(call))
                wait_until(lambda: _waiting_on_lock(db), TIMEOUT, "the command to block")
                for child in pool_processes(victim):
                    child.kill()  # mid-transaction: nothing committed
                holder.rollback()
            outcome = handle.outcome(TIMEOUT)  # redelivered to the new pool process
        finally:
            victim.stop()
    applied = db.attempt_rows(UUID(call))
    reliability.record("killed-before-commit", commands=1, **_counts([applied], 1))
    assert outcome["ok"] is True
    assert db.row(UUID(call))["attempt_count"] == applied == 1


@pytest.mark.scenario("killed-after-commit")
@pytest.mark.slow
def test_killed_after_commit_before_ack_the_redelivery_changes_nothing(
    db: Db, worker: Process, client: CallsClient, control_app: Celery, database_url: str,
    redis_url: str, tmp_path: Path, reliability: Reliability,
) -> None:  # fmt: skip
    call = new_call(db, client)
    command_id = f"die-after-commit-{uuid4()}"
    flag = tmp_path / "died"
    with session_worker_paused(control_app):
        victim = own_worker(database_url, redis_url, tmp_path, "victim2", control_app=control_app,
            CALLS_WORKER_TEST_DIE_AFTER_COMMIT=command_id,
            CALLS_WORKER_TEST_FAULT_FLAG=str(flag),
        )  # fmt: skip
        try:
            handle = client.send("add_attempt", attempt(call), command_id=command_id)
            outcome = handle.outcome(TIMEOUT)
            wait_until(lambda: queues_drained(redis_url), TIMEOUT, "the queue to drain")
        finally:
            victim.stop()
    assert flag.exists(), "the fault fired: a pool process died after the commit"

    # The first delivery died before logging; the redelivery found the command recorded.
    line = f"command add_attempt {command_id}"
    assert victim.output().count(line) + worker.output().count(line) == 1
    applied = db.attempt_rows(UUID(call))
    reliability.record("killed-after-commit", commands=1, **_counts([applied], 1))
    assert outcome["ok"] is True
    assert outcome["call"]["attemptCount"] == 1
    assert db.row(UUID(call))["attempt_count"] == applied == 1


@pytest.mark.scenario("warm-shutdown")
@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 32])
def test_warm_shutdown_finishes_or_returns_every_command(
    db: Db, worker: Process, client: CallsClient, control_app: Celery, database_url: str,
    redis_url: str, tmp_path: Path, reliability: Reliability, batch_size: int,
) -> None:  # fmt: skip
    """SIGTERM while some commands are handled, one is running (held on a lock) and most
    wait in the queue, each of the three shown at that moment: the running one finishes,
    the waiting ones go back to the queue, nothing is lost or doubled. In batches, the
    batch running (held on the lock) finishes, and those buffered go back."""
    calls = [new_call(db, client) for _ in range(40)]
    held = calls[3]  # the victim handles three, then runs into the lock on the fourth
    with session_worker_paused(control_app):
        victim = own_worker(database_url, redis_url, tmp_path, "victim3", control_app=control_app,
                            CALLS_WORKER_COMMAND_BATCH_SIZE=str(batch_size))  # fmt: skip
        with db.engine.connect() as holder:
            holder.exec_driver_sql("SELECT 1 FROM calls WHERE uuid = %s FOR UPDATE", (held,))
            handles = [client.send("add_attempt", attempt(call)) for call in calls]
            wait_until(lambda: _waiting_on_lock(db), TIMEOUT, "the fourth command to run")
            handled = sum(db.attempt_rows(UUID(c)) for c in calls)
            waiting = redis.Redis.from_url(redis_url).llen("calls.commands")
            victim.popen.send_signal(signal.SIGTERM)
            time.sleep(1)  # the warm shutdown waits for the running command...
            assert victim.popen.poll() is None, "the victim left its running command"
            holder.rollback()  # ... which can now finish
        assert victim.stop(signal.SIGTERM, timeout=TIMEOUT) == 0
    if batch_size == 1:
        assert handled == 3, "some handled"
        assert waiting >= len(calls) // 2, "most waiting"
    else:  # a batch of the first few (with the held call among them) waits on the lock
        assert handled <= 3, "the batch with the held call waited"
        assert waiting + batch_size >= len(calls) - handled, "the rest queued or buffered"
    assert db.attempt_rows(UUID(held)) == 1, "the running one finished before the worker left"
    outcomes = [h.outcome(TIMEOUT) for h in handles]  # the rest, by the session's worker
    applied = [db.attempt_rows(UUID(c)) for c in calls]
    reliability.record("warm-shutdown", commands=len(calls), **_counts(applied, 1))
    assert all(o["ok"] for o in outcomes)
    assert [db.row(UUID(c))["attempt_count"] for c in calls] == applied == [1] * len(calls)


def _counts(applied: list[int], expected: int) -> dict[str, int]:
    lost, doubled = counted(applied, expected)
    return {"lost": lost, "doubled": doubled}


def _waiting_on_lock(db: Db) -> bool:
    return bool(
        db.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND application_name = 'calls-worker'"
        ).scalar()
    )


@pytest.mark.slow
def test_a_command_past_its_time_limit_is_kept_and_not_requeued(
    db: Db, worker: Process, client: CallsClient, control_app: Celery, database_url: str,
    redis_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Blocked on a lock past its time limit (4 s here, soft at 2 s): the command is kept
    among the rejected ones and its message acknowledged, not handed to the next worker."""
    call = new_call(db, client)
    with session_worker_paused(control_app):
        slow = own_worker(database_url, redis_url, tmp_path, "slow", control_app=control_app,
                          CALLS_WORKER_TASK_TIME_LIMIT_SECONDS="4")  # fmt: skip
        try:
            with db.engine.connect() as holder:  # the command waits on this lock, and waits
                holder.exec_driver_sql("SELECT 1 FROM calls WHERE uuid = %s FOR UPDATE", (call,))
                handle = client.send("add_attempt", attempt(call))
                kept = wait_until(
                    lambda: db.sql("SELECT reason FROM worker_rejected_commands WHERE"
                                   " command_id = :c", c=handle.command_id).scalar(),
                    TIMEOUT, "the command to be kept",
                )  # fmt: skip
                holder.rollback()
            assert "TimeLimitExceeded" in kept
            wait_until(lambda: queues_drained(redis_url), TIMEOUT, "the message to be acked")
            time.sleep(2)  # had it been requeued, it would run now that the lock is gone
            assert db.attempt_rows(UUID(call)) == 0
            assert slow.popen.poll() is None
        finally:
            slow.stop()
