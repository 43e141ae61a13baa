"""Group commit through real worker processes: a stream queued before the worker starts is
taken as one batch (the worker prefetches it at once), so what happens inside a batch is
shown, not hoped for; and each failure path of a batch: a pool process killed after the
commit, a batch that raises after it, a broker restarted under a batching worker.

Each test runs its own worker on a Redis database of its own.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis

from calls_worker.client import CallsClient
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import (
    Process,
    own_worker,
    queues_drained,
    redis_database,
)

TIMEOUT = 60


def _person(db: Db) -> dict[str, str]:
    organization = db.organization(5)
    return {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}


def _batches(worker: Process) -> list[int]:
    return [int(n) for n in re.findall(r"batch of (\d+) commands applied", worker.output())]


@pytest.mark.parametrize("batch_size", [1, 12])
def test_within_a_batch_each_command_is_applied_as_if_alone_in_order(
    db: Db, database_url: str, redis_url: str, tmp_path: Path, batch_size: int
) -> None:
    """Create, two attempts and complete of one call; a command id sent twice; a malformed
    command and a create of a taken uuid between good ones — queued first, then taken by a
    worker as one batch of 12 (or one by one, batch size 1): the same outcomes either way."""
    broker = redis_database(redis_url, 5)
    redis.Redis.from_url(broker).flushdb()
    person = _person(db)
    with CallsClient(broker) as client:
        existing = str(uuid4())
        first = client.send("create", {**person, "uuid": existing})
        call, other = str(uuid4()), str(uuid4())
        user = str(uuid4())
        twice = str(uuid4())
        handles = [
            client.send("create", {**person, "uuid": call}),
            client.send("add_attempt", {"callUuid": call, "userUuid": user,
                                        "attemptedAt": ISSUED}, command_id=twice),
            client.send_unchecked("cancel", '{"callUuid": "not a uuid"}'),
            client.send("add_attempt", {"callUuid": call, "userUuid": user,
                                        "attemptedAt": ISSUED}, command_id=twice),
            client.send("create", {**person, "uuid": existing, "notes": "second"}),
            client.send("add_attempt", {"callUuid": call, "userUuid": str(uuid4()),
                                        "attemptedAt": "2026-03-01T08:00:00+00:00"}),
            client.send("create", {**person, "uuid": other}),
            client.send("complete", {"callUuid": call, "userUuid": user, "result": "reached"}),
            client.send("add_attempt", {"callUuid": call, "userUuid": str(uuid4()),
                                        "attemptedAt": ISSUED}),
            client.send("cancel", {"callUuid": other}),
            client.send("expire", {"callUuid": str(uuid4())}),
        ]
        worker = own_worker(database_url, broker, tmp_path, f"order{batch_size}",
                         CALLS_WORKER_COMMAND_BATCH_SIZE=str(batch_size),
                         CALLS_WORKER_COMMAND_BATCH_WAIT_MS="50")  # fmt: skip
        try:
            assert first.outcome(TIMEOUT)["ok"]
            outcomes = [handle.outcome(TIMEOUT) for handle in handles]
        finally:
            worker.stop()
    codes = [o["ok"] or o["error"]["code"] for o in outcomes]
    assert codes[0] is True
    assert codes[1] is True
    assert outcomes[3] == outcomes[1]
    assert codes[2] == "invalid"
    assert codes[4] == "conflict"
    assert outcomes[5]["call"]["attemptCount"] == 2
    assert codes[6] is True
    assert outcomes[7]["call"]["status"] == "completed"
    assert codes[8] == "conflict"  # no attempt on an ended call
    assert outcomes[9]["call"]["status"] == "cancelled"
    assert codes[10] == "not_found"
    assert db.attempt_rows(UUID(call)) == 2
    assert db.row(UUID(existing))["notes"] is None
    # The first command alone, then the eleven queued behind it in one batch; batch size 1
    # applies each command on its own, without batches.
    sizes = _batches(worker)
    if batch_size > 1:
        assert sum(sizes) == 12
        assert max(sizes) >= 11, sizes
    else:
        assert sizes == []


def _queued(client: CallsClient, person: dict[str, str], calls: int) -> list[tuple[str, Any]]:
    """A create and an attempt for each of ``calls`` new calls, queued."""
    handles = []
    for _ in range(calls):
        call = str(uuid4())
        handles.append((call, client.send("create", {**person, "uuid": call})))
        handles.append((call, client.send("add_attempt", {
            "callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED})))  # fmt: skip
    return handles


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["die", "raise"])
def test_a_batch_lost_after_its_commit_comes_back_and_answers_with_its_first_outcomes(
    db: Db, database_url: str, redis_url: str, tmp_path: Path, fault: str
) -> None:
    """Its commit done, the pool process dies (SIGKILL) or the batch raises, while the
    outcomes are logged: before they are stored and before any message is acknowledged.
    Every message of the batch comes back; each is answered with its first outcome and
    applied once."""
    broker = redis_database(redis_url, 6)
    redis.Redis.from_url(broker).flushdb()
    person = _person(db)
    with CallsClient(broker) as client:
        handles = _queued(client, person, 8)
        target = handles[5][1].command_id  # the sixth command of the batch of sixteen
        variable = {"die": "CALLS_WORKER_TEST_DIE_AFTER_COMMIT",
                    "raise": "CALLS_WORKER_TEST_RAISE_AFTER_COMMIT"}[fault]  # fmt: skip
        flag = tmp_path / "fault-flag"
        worker = own_worker(database_url, broker, tmp_path, f"lost{fault}",
                         CALLS_WORKER_COMMAND_BATCH_SIZE="16",
                         CALLS_WORKER_COMMAND_BATCH_WAIT_MS="50",
                         CALLS_WORKER_TEST_FAULT_FLAG=str(flag), **{variable: target})  # fmt: skip
        try:
            outcomes = [handle.outcome(TIMEOUT) for _, handle in handles]
            assert flag.exists(), "the fault did not strike"
            deadline = time.monotonic() + TIMEOUT
            while not queues_drained(broker) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert queues_drained(broker), "a message was left unacknowledged"
        finally:
            worker.stop()
    assert all(o["ok"] for o in outcomes)
    for call, _ in handles[::2]:
        assert db.attempt_rows(UUID(call)) == 1
        assert db.row(UUID(call))["attempt_count"] == 1
    applied = db.sql("SELECT count(*) FROM worker_processed_commands WHERE command_id ="
                     " ANY(:ids)", ids=[h.command_id for _, h in handles]).scalar()  # fmt: skip
    assert applied == 16
    output = worker.output()
    if fault == "die":
        assert "WorkerLostError" in output or "exited prematurely" in output
    else:
        assert "raised, they go back to the queue" in output
    # The batch was applied once and its messages redelivered: 16 outcomes, two batches.
    assert _batches(worker)[-1] == 16


@pytest.mark.slow
def test_batching_goes_on_after_the_broker_restarts(
    db: Db, database_url: str, tmp_path: Path
) -> None:
    """A throw-away Redis restarted under a worker that waits 50 ms for its batches: after
    the reconnect, a lone command is still applied (its flush timer is not one of the old
    connection's, which would never fire), and a stream of them is too."""
    from calls_worker.adapters.embedded import start_redis

    server = start_redis(tmp_path / "redis")
    person = _person(db)
    try:
        worker = own_worker(database_url, server.url, tmp_path, "reconnect",
                         CALLS_WORKER_COMMAND_BATCH_WAIT_MS="50",
                         CALLS_WORKER_VISIBILITY_TIMEOUT_SECONDS="10")  # fmt: skip
        try:
            with CallsClient(server.url) as client:
                assert client.send("create", person).outcome(TIMEOUT)["ok"]
            # Acknowledged before the broker goes: kombu's Redis transport, closing a
            # channel that holds an unacknowledged message while the server is away, raises
            # where the worker cannot recover (AttributeError in _connparams) and exits.
            deadline = time.monotonic() + TIMEOUT
            while not queues_drained(server.url):
                assert time.monotonic() < deadline, "the command was not acknowledged"
                time.sleep(0.05)
            server.stop()
            time.sleep(2)
            server = start_redis(tmp_path / "redis", port=server.port)
            deadline = time.monotonic() + TIMEOUT
            while worker.output().count("Connected to redis") < 2:
                assert time.monotonic() < deadline, "the worker did not reconnect"
                time.sleep(0.2)
            with CallsClient(server.url) as client:
                lone = client.send("create", person).outcome(TIMEOUT)
                stream = [client.send("create", person) for _ in range(20)]
                outcomes = [handle.outcome(TIMEOUT) for handle in stream]
        finally:
            worker.stop()
    finally:
        server.stop()
    assert lone["ok"]
    assert all(o["ok"] for o in outcomes)
