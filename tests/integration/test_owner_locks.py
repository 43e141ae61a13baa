"""A command of the worker and a change of the API's never close a cycle of locks.

A change of a call's attempts or status takes its owning organization's lock (shared, in the
triggers); the API moving a person to another owner takes the old and the new owner's
exclusively, then rechecks, and so locks, that person's calls. If the worker locked a call
first and its owner second, the two could wait for each other, and PostgreSQL would end the
cycle by failing one of them: the one that began waiting first, here the API's. The worker
locks the owners first, in key order, then the calls.

Each test holds the worker right after it took its locks, lets the API's transaction run
into them, then lets the worker go on: both commit.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from calls_worker.adapters.db import unit_of_work
from calls_worker.adapters.db.calls import LOCK_CALLS
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import BatchEntry, handle, handle_batch
from tests.db_world import ISSUED, Db
from tests.integration.test_races import WAIT, blocked_on_lock

ROUNDS_SECONDS = float(os.environ.get("CALLS_WORKER_TEST_COLLIDE_SECONDS", "10"))


class HeldAfterLocking(SqlUnitOfWork):
    """Stops once it has taken its locks (a batch's, or a lone command's call), before it
    writes anything, until released."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.locked = threading.Event()
        self.release = threading.Event()

    def _hold(self) -> None:
        if not self.locked.is_set():
            self.locked.set()
            assert self.release.wait(WAIT)

    def __enter__(self) -> HeldAfterLocking:
        super().__enter__()
        locked_call = self.calls.get_for_update

        def get_for_update(call_uuid: UUID) -> Any:
            call = locked_call(call_uuid)
            self._hold()
            return call

        self.calls.get_for_update = get_for_update  # type: ignore[method-assign]
        return self

    def begin_batch(self, *args: Any) -> Any:
        recorded = super().begin_batch(*args)
        self._hold()
        return recorded


def api_moves_someone_and_adds_an_attempt(engine: Engine, person: UUID, to: UUID,
                                          call: UUID) -> None:  # fmt: skip
    """The API, in one transaction: a person of the call's owner moves to another owner
    (both owners locked exclusively), then an attempt on the call (its row locked)."""
    with engine.begin() as connection:
        connection.execute(text("UPDATE persons SET owning_organization_uuid = :o WHERE uuid = :p"),
                           {"o": to, "p": person})  # fmt: skip
        connection.execute(text(
            "INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
            " VALUES (:c, gen_random_uuid(), now())"), {"c": call})  # fmt: skip


def meet(db: Db, engine: Engine, worker: HeldAfterLocking, apply: Any) -> Outcome:
    """The worker takes its locks and stops; the API runs into them; the worker goes on."""
    owner, other = db.organization(5), db.organization(5)
    call = db.call(db.person(owner), owner, attempts=1)
    mover = db.person(owner)
    with ThreadPoolExecutor(2) as pool:
        applied: Future[Outcome] = pool.submit(apply, worker, call)
        assert worker.locked.wait(WAIT)
        api = pool.submit(api_moves_someone_and_adds_an_attempt, engine, mover, other, call)
        try:
            blocked_on_lock(db, api)  # waits for the worker's locks
        finally:
            worker.release.set()
        api.result(30)  # raised DeadlockDetected when the worker locked the call first
        outcome = applied.result(30)
    assert db.row(call)["attempt_count"] == db.attempt_rows(call) == 3
    return outcome


def test_a_batch_locks_owners_before_calls_so_the_api_never_deadlocks_with_it(
    db: Db, engine: Engine
) -> None:
    def apply(uow: HeldAfterLocking, call: UUID) -> Outcome:
        command = parse_command("add_attempt", {"callUuid": str(call), "userUuid": str(uuid4()),
                                                "attemptedAt": ISSUED})  # fmt: skip
        result = handle_batch([BatchEntry(str(uuid4()), command)], lambda: uow)
        assert result.failed == {}, result.failed
        outcome = result.outcomes[0]
        assert outcome is not None
        return outcome

    outcome = meet(db, engine, HeldAfterLocking(engine), apply)
    assert outcome["ok"] is True, outcome


def test_a_lone_command_locks_its_owner_before_its_call(db: Db, engine: Engine) -> None:
    def apply(uow: HeldAfterLocking, call: UUID) -> Outcome:
        command = parse_command("add_attempt", {"callUuid": str(call), "userUuid": str(uuid4()),
                                                "attemptedAt": ISSUED})  # fmt: skip
        return handle(str(uuid4()), command, uow)

    outcome = meet(db, engine, HeldAfterLocking(engine), apply)
    assert outcome["ok"] is True, outcome


def test_batches_and_the_api_collide_many_times_and_no_api_transaction_deadlocks(
    db: Db, engine: Engine
) -> None:
    """Two real connections for ROUNDS seconds: the worker applies batches of attempts and
    creates on the calls and people of four organizations, in random order; the API, in
    transactions of its own, moves those people between the organizations, changes their
    maxima, and adds attempts on the same calls. No transaction of the API's is failed to
    break a deadlock (the worker's are counted too: none expected either)."""
    chance = random.Random(int(os.environ.get("CALLS_WORKER_TEST_SEED", "0")) or None)
    owners = [db.organization(1000) for _ in range(4)]
    people = [db.person(owners[n % 4]) for n in range(12)]
    calls = [db.call(person, db.sql("SELECT owning_organization_uuid FROM persons"
                                    " WHERE uuid = :p", p=person).scalar())
             for person in people for _ in range(2)]  # fmt: skip
    stop = threading.Event()
    api_deadlocks: list[str] = []
    api_done = Counter[str]()
    worker = Counter[str]()

    def api() -> None:
        while not stop.is_set():
            try:
                with engine.begin() as connection:
                    if chance.random() < 0.5:
                        connection.execute(text(
                            "UPDATE persons SET owning_organization_uuid = :o WHERE uuid = :p"),
                            {"o": chance.choice(owners), "p": chance.choice(people)})  # fmt: skip
                    else:
                        connection.execute(text(
                            "UPDATE organizations SET max_call_attempts = :m WHERE uuid = :o"),
                            {"m": chance.randint(900, 999),
                             "o": chance.choice(owners)})  # fmt: skip
                    # In uuid order, as the worker locks calls: two writers that change several
                    # calls in one transaction each, in no fixed order, can deadlock on the
                    # calls' rows whoever they are (two of the API's own included).
                    for call in sorted(chance.sample(calls, 2)):
                        connection.execute(text(
                            "INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
                            " VALUES (:c, gen_random_uuid(), now())"), {"c": call})  # fmt: skip
                api_done["transactions"] += 1
            except OperationalError as error:
                if not isinstance(error.orig, psycopg.errors.DeadlockDetected):
                    raise
                api_deadlocks.append(str(error.orig).splitlines()[-1])

    def batch() -> list[BatchEntry]:
        entries = []
        for _ in range(chance.randint(2, 8)):
            if chance.random() < 0.2:
                person = chance.choice(people)
                payload = {"personUuid": str(person), "organizationUuid": str(owners[0])}
                entries.append(BatchEntry(str(uuid4()), parse_command("create", payload)))
                continue
            attempt = {"callUuid": str(chance.choice(calls)), "userUuid": str(uuid4()),
                       "attemptedAt": ISSUED}  # fmt: skip
            entries.append(BatchEntry(str(uuid4()), parse_command("add_attempt", attempt)))
        return entries

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(api)
        deadline = time.monotonic() + ROUNDS_SECONDS
        try:
            while time.monotonic() < deadline:
                try:
                    result = handle_batch(batch(), lambda: SqlUnitOfWork(engine))
                except psycopg.errors.DeadlockDetected:
                    worker["deadlocks"] += 1
                    continue
                worker["batches"] += 1
                worker["failed"] += len(result.failed)
                worker["ok"] += sum(1 for o in result.outcomes if o is not None and o["ok"])
        finally:
            stop.set()
            running.result(60)
    print(f"api: {dict(api_done)}, {len(api_deadlocks)} deadlocks; worker: {dict(worker)}")
    assert api_deadlocks == []
    assert worker["deadlocks"] == worker["failed"] == 0
    assert api_done["transactions"] > 100
    assert worker["batches"] > 100


def test_a_call_committed_between_the_batchs_lock_and_its_load_is_locked_too(
    db: Db, engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch locks its calls in one statement and loads them in the next (each with its
    own snapshot). A call another transaction commits in between (created there) is loaded
    but was not locked: the batch locks again until every call it loaded is locked. Before,
    it changed such a call unlocked, while another transaction changed it too (the soak
    found an attempt added to a call cancelled meanwhile). The lock's statement is made to
    last here, so that the creating transaction commits inside it."""
    organization = db.organization(3)
    person = db.person(organization)
    call = uuid4()
    slow = LOCK_CALLS.replace(" AS locked FROM", " AS locked, pg_sleep(1.5) AS slept FROM", 1)
    assert slow != LOCK_CALLS
    monkeypatch.setattr(unit_of_work, "LOCK_CALLS", slow)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    creating = psycopg.connect(url, autocommit=False)
    try:
        creating.execute(
            "INSERT INTO calls (uuid, status, person_uuid, organization_uuid, created_at,"
            " updated_at) VALUES (%s, 'requested', %s, %s, now(), now())",
            (call, person, organization))  # fmt: skip
        worker = HeldAfterLocking(engine)
        command = parse_command("add_attempt", {"callUuid": str(call), "userUuid": str(uuid4()),
                                                "attemptedAt": ISSUED})  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            applied = pool.submit(handle_batch, [BatchEntry(str(uuid4()), command)],
                                  lambda: worker)  # fmt: skip
            deadline = time.monotonic() + WAIT
            while not db.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                             " AND datname = current_database()").scalar():  # fmt: skip
                assert time.monotonic() < deadline, "the batch's lock statement never ran"
                time.sleep(0.01)
            creating.commit()  # inside the lock's statement, before the load's
            try:
                assert worker.locked.wait(WAIT)
                with (psycopg.connect(url, autocommit=True) as probe,
                      pytest.raises(psycopg.errors.LockNotAvailable)):  # fmt: skip
                    probe.execute("SELECT 1 FROM calls WHERE uuid = %s FOR UPDATE NOWAIT",
                                  (call,))  # fmt: skip
            finally:
                worker.release.set()
            result = applied.result(30)
        outcome = result.outcomes[0]
        assert outcome is not None
        assert outcome["ok"], outcome
    finally:
        creating.close()


def test_the_owners_are_found_by_key_not_by_reading_every_person(
    db: Db, database_url: str
) -> None:
    """The first statement of every command and batch finds the people it names, and those
    of the calls it names, through the persons' primary key: with an OR of the two it read
    the whole table (10.9 ms a statement at 100,000 persons, twice a batch)."""
    from calls_worker.adapters.db.calls import LOCK_OWNERS

    organization = db.organization(3)
    db.sql("INSERT INTO persons (uuid, owning_organization_uuid)"
           " SELECT gen_random_uuid(), :o FROM generate_series(1, 20000)",
           o=organization)  # fmt: skip
    person = db.person(organization)
    call = db.call(person, organization)
    db.sql("ANALYZE persons")
    db.sql("ANALYZE calls")
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = psycopg.ClientCursor(connection)
        for named in ({"persons": [person], "calls": []}, {"persons": [], "calls": [call]},
                      {"persons": [person], "calls": [call, uuid4()]}):  # fmt: skip
            cursor.execute("EXPLAIN " + cursor.mogrify(LOCK_OWNERS, named))
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "Seq Scan on persons" not in plan, plan
            assert "persons_pkey" in plan, plan
