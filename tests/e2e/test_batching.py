"""Group commit through real worker processes: a stream queued before the worker starts is
taken as one batch (the worker prefetches it at once), so what happens inside a batch is
shown, not hoped for; and each failure path of a batch: a pool process killed after the
commit, a batch that raises after it, a broker restarted under a batching worker.

Each test runs its own worker on a Redis database of its own.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis
from sqlalchemy import Engine

from calls_worker.adapters.db.migrate import upgrade
from calls_worker.client import CallsClient
from tests.db_world import ISSUED, Db
from tests.e2e.batch_faults import GOOD, kills, outcome_store_away, poison_among_good_commands
from tests.e2e.conftest import (
    Process,
    own_worker,
    queues_drained,
    redis_database,
    wait_until,
)
from tests.integration.test_adoption import api_database

TIMEOUT = 60
ROOT = Path(__file__).resolve().parents[2]


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
    # applies each command on its own, as a batch of one (the same path).
    sizes = _batches(worker)
    assert sum(sizes) == 12
    if batch_size > 1:
        assert max(sizes) >= 11, sizes
    else:
        assert sizes == [1] * 12


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
        flag, struck = tmp_path / "fault-flag", tmp_path / "fault-batches"
        worker = own_worker(database_url, broker, tmp_path, f"lost{fault}",
                         CALLS_WORKER_COMMAND_BATCH_SIZE="16",
                         CALLS_WORKER_COMMAND_BATCH_WAIT_MS="50",
                         CALLS_WORKER_TEST_FAULT_FLAG=str(flag),
                         CALLS_WORKER_TEST_FAULT_LOG=str(struck), **{variable: target})  # fmt: skip
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
    # The batch was applied once, and its messages, redelivered, came back each alone
    # (batching.py: a redelivered message is applied in a batch of its own). All sixteen
    # were queued before the worker started, so the first batch takes most of them; on a
    # busy machine the rest come fresh within its 50 ms wait, as a batch of their own.
    first, *again = [line.split() for line in struck.read_text().splitlines()]
    assert len(first) >= 2, f"the fault's batch held {first}"
    assert again == [[target]], "the target came back in a batch not its own"
    batches = _batches(worker)  # those applied and answered: the one the fault struck is not
    assert sum(batches) == 16
    assert batches[-len(first):] == [1] * len(first)


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


def _raw(task: str, command: dict[str, Any], command_id: str) -> str:
    """The documented envelope (docs/examples/cancel-message.json), as a producer that is
    neither Celery nor our client writes it to Redis."""
    envelope = json.loads((ROOT / "docs/examples/cancel-message.json").read_text())
    body = [[], {"command": {"issuedAt": ISSUED, **command}}, {}]
    envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    envelope["headers"].update(task=task, id=command_id, root_id=command_id)
    envelope["properties"].update(correlation_id=command_id, delivery_tag=str(uuid4()))
    return json.dumps(envelope)


def test_a_raw_burst_on_the_apis_adopted_database_is_applied_in_batches_as_one_by_one(
    empty_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The API's own tables (its constraint names, its data, adopted by migrate), a producer
    that writes the documented envelope straight to Redis, and the API writing attempts
    while the worker applies the burst in batches: each command's outcome is the one it
    gets alone, each effect is there once."""
    api = api_database(empty_database_url)
    try:
        _raw_burst(api, empty_database_url, redis_url, tmp_path)
    finally:
        api.dispose()  # after every query of the test: none leaves a connection open


def _raw_burst(api: Engine, database_url: str, redis_url: str, tmp_path: Path) -> None:
    upgrade(api, batch_size=100)
    db = Db(api)
    limited = db.sql("SELECT uuid FROM organizations WHERE max_call_attempts = 5 LIMIT 1").scalar()
    persons = list(db.sql("SELECT uuid FROM persons WHERE owning_organization_uuid = :o"
                          " LIMIT 10", o=limited).scalars())  # fmt: skip
    open_calls = list(db.sql(
        "SELECT c.uuid FROM calls c JOIN persons p ON p.uuid = c.person_uuid"
        " WHERE p.owning_organization_uuid = :o AND c.status = 'requested'"
        " AND c.external_metadata IS NULL AND c.attempt_count < 3 ORDER BY c.uuid LIMIT 10",
        o=limited).scalars())  # fmt: skip
    taken = db.sql("SELECT uuid FROM calls LIMIT 1").scalar()
    broker = redis_database(redis_url, 7)
    queue = redis.Redis.from_url(broker)
    queue.flushdb()
    sent: list[tuple[str, str, dict[str, Any]]] = []
    for n, person in enumerate(persons):
        new = {"uuid": str(uuid4()), "personUuid": str(person), "organizationUuid": str(limited)}
        sent.append((f"create-{n}", "calls.create", new))
        sent.append((f"attempt-{n}", "calls.add_attempt", {"callUuid": str(open_calls[n]),
                     "userUuid": str(uuid4()), "attemptedAt": ISSUED}))  # fmt: skip
        sent.append((f"attempt-{n}", "calls.add_attempt", {"callUuid": str(open_calls[n]),
                     "userUuid": str(uuid4()), "attemptedAt": ISSUED}))  # the same id again
    sent.append(("taken", "calls.create", {"uuid": str(taken), "personUuid": str(persons[0]),
                                           "organizationUuid": str(limited)}))  # fmt: skip
    sent.append(("cancel-0", "calls.cancel", {"callUuid": str(open_calls[0])}))
    sent.append(("bad", "calls.cancel", {"callUuid": "not a uuid"}))
    counts = {c: db.row(c)["attempt_count"] for c in open_calls}
    for command_id, task, command in sent:
        queue.lpush("calls.commands", _raw(task, command, command_id))
    worker = own_worker(database_url, broker, tmp_path, "adopted",
                        CALLS_WORKER_COMMAND_BATCH_SIZE="16",
                        CALLS_WORKER_COMMAND_BATCH_WAIT_MS="50")  # fmt: skip
    try:
        for call in open_calls[5:]:  # the API's own attempts, meanwhile
            db.plain_attempt(call)

        def outcome_of(command_id: str) -> Any:
            meta = wait_until(lambda: queue.get(f"celery-task-meta-{command_id}"), TIMEOUT,
                              f"the outcome of {command_id}")  # fmt: skip
            return json.loads(meta)["result"]

        outcomes = {cid: outcome_of(cid) for cid, _, _ in sent if cid != "bad"}
        wait_until(lambda: queues_drained(broker), TIMEOUT, "every message acknowledged")
    finally:
        worker.stop()
    assert max(_batches(worker)) > 1  # batched indeed
    for n in range(len(persons)):
        assert outcomes[f"create-{n}"]["ok"] is True, outcomes[f"create-{n}"]
        attempt = outcomes[f"attempt-{n}"]
        assert attempt["ok"] is True, attempt
        # after the API's own attempt on the call, or before it
        possible = {counts[open_calls[n]] + 1} | ({counts[open_calls[n]] + 2} if n >= 5 else set())
        assert attempt["call"]["attemptCount"] in possible
    assert outcomes["taken"]["error"]["code"] == "conflict"  # the API's name for the key
    assert outcomes["cancel-0"]["call"]["status"] == "cancelled"
    api_attempts = 1
    for n, call in enumerate(open_calls):
        expected = counts[call] + 1 + (api_attempts if n >= 5 else 0)
        assert db.row(call)["attempt_count"] == db.attempt_rows(call) == expected
    assert db.sql("SELECT count(*) FROM calls WHERE person_uuid = ANY(:p) AND created_at"
                  " > now() - interval '10 minutes'", p=persons).scalar() >= len(persons)
    rejected = db.sql("SELECT command_id, reason FROM worker_rejected_commands").all()
    assert [r.command_id for r in rejected] == ["bad"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_on_redis_a_poison_command_fails_alone_and_its_batch_mates_are_applied(
    db: Db, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The RabbitMQ test's poison (test_rabbitmq.py) on Redis: its batch-mates are applied;
    it comes back alone each time (Redis marks a restored message redelivered) and, Redis
    having no delivery limit, for as long as it kills its pool process (docs/reliability.md)."""
    broker = redis_database(redis_url, 12)
    redis.Redis.from_url(broker).flushdb()

    def killed_alone_again(poison: str, workers: list[Any]) -> bool:
        return kills(workers) >= 4

    seen = poison_among_good_commands(db, database_url, broker, broker, tmp_path,
                                      until=killed_alone_again,
                                      what="the poison delivered again and again")  # fmt: skip
    assert all(outcome["ok"] for outcome in seen["outcomes"]), seen["outcomes"]
    assert db.sql("SELECT count(*) FROM calls").scalar() == GOOD
    assert seen["poison_calls"] == 0
    # Its batch-mates died with it once at most: from its second delivery on, it was alone.
    _first, *later = seen["killed_batches"]
    assert later, "the poison was delivered once only"
    assert all(batch == [seen["poison"].command_id] for batch in later), seen["killed_batches"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_on_redis_an_outcome_store_away_requeues_nothing_and_pauses_the_workers(
    db: Db, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    broker = redis_database(redis_url, 12)
    redis.Redis.from_url(broker).flushdb()
    seen = outcome_store_away(db, database_url, broker, tmp_path)
    assert all(outcome is not None and outcome["outcome"]["ok"] for outcome in seen["outcomes"])
    assert seen["calls"] == len(seen["ids"])
    assert seen["rejected"] == 1  # the invalid command, kept once however often it came
    assert seen["invalid_told"]["error"]["code"] == "invalid", seen["invalid_told"]
    assert "the result backend does not answer" in seen["logs"]
    assert "raised, they go back to the queue" not in seen["logs"]
    assert seen["after"]["ok"] is True
