"""Races on real connections: commands and sweeps that meet on the same calls.

The deterministic tests hold one side just before its commit (its row locks taken) and let
the other run; the loops let real threads collide at random, many times.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import Engine, text

from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import handle
from calls_worker.service.sweep import SweepResult, expire_exhausted_calls
from tests.db_world import ISSUED, Db
from tests.reliability import Reliability

NOW = datetime(2026, 4, 1, 6, 0, tzinfo=UTC)
WAIT = 10.0


class HeldUnitOfWork(SqlUnitOfWork):
    """Writes, then stops just before its first COMMIT until released: its row locks and
    uncommitted rows are in the database by then."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.at_commit = threading.Event()
        self.release = threading.Event()

    def commit(self) -> None:
        if not self.release.is_set():
            self.flush()
            self.at_commit.set()
            assert self.release.wait(WAIT)
        super().commit()


def exhausted_calls(db: Db, count: int) -> list[UUID]:
    organization = db.organization(1)
    person = db.person(organization)
    return [db.call(person, organization, attempts=1) for _ in range(count)]


def complete(engine: Engine, call: UUID, uow: SqlUnitOfWork | None = None) -> Outcome:
    command = parse_command(
        "complete", {"callUuid": str(call), "userUuid": str(uuid4()), "result": "reached"}
    )
    return handle(str(uuid4()), command, uow or SqlUnitOfWork(engine))


def sweep(engine: Engine, batch_size: int = 100, uow: SqlUnitOfWork | None = None) -> SweepResult:
    return expire_exhausted_calls(lambda: uow or SqlUnitOfWork(engine), NOW, batch_size)


def in_thread(pool: ThreadPoolExecutor, work: Callable[[], Any]) -> Future[Any]:
    return pool.submit(work)


def test_sweep_skips_a_call_being_completed(db: Db, engine: Engine) -> None:
    (call,) = exhausted_calls(db, 1)
    held = HeldUnitOfWork(engine)
    with ThreadPoolExecutor(1) as pool:
        completing = in_thread(pool, lambda: complete(engine, call, held))
        assert held.at_commit.wait(WAIT)
        assert sweep(engine).expired == 0  # returns at once: the locked call is skipped
        held.release.set()
        assert completing.result(WAIT)["ok"] is True
    assert sweep(engine).expired == 0
    row = db.row(call)
    assert (row["status"], row["expired_at"]) == ("completed", None)


def test_complete_waits_for_a_sweep_then_conflicts(db: Db, engine: Engine) -> None:
    (call,) = exhausted_calls(db, 1)
    held = HeldUnitOfWork(engine)
    with ThreadPoolExecutor(2) as pool:
        sweeping = in_thread(pool, lambda: sweep(engine, uow=held))
        assert held.at_commit.wait(WAIT)
        completing = in_thread(pool, lambda: complete(engine, call))
        blocked_on_lock(db, completing)  # on the sweep's row lock
        held.release.set()
        assert sweeping.result(WAIT).expired == 1
        outcome = completing.result(WAIT)
    assert outcome["error"]["code"] == "conflict"
    assert "expired" in outcome["error"]["message"]
    row = db.row(call)
    assert (row["status"], row["completed_at"]) == ("expired", None)


@dataclass
class Collision:
    results: list[Any]
    overlapped: bool
    """Every work started before any other ended: they ran at the same time."""


def collide(*works: Callable[[], Any]) -> Collision:
    """Run the works in threads that all start at the same moment; their results, and
    whether they did run at the same time."""
    start = threading.Barrier(len(works))
    spans: list[tuple[float, float]] = []

    def run(work: Callable[[], Any]) -> Any:
        start.wait()
        began = time.monotonic()
        try:
            return work()
        finally:
            spans.append((began, time.monotonic()))

    with ThreadPoolExecutor(len(works)) as pool:
        futures = [pool.submit(run, work) for work in works]
        results = [future.result(60) for future in futures]
    overlapped = max(b for b, _ in spans) < min(e for _, e in spans)
    return Collision(results, overlapped)


def blocked_on_lock(db: Db, waiting: Future[Any]) -> None:
    """``waiting`` is running and waits on a lock in the database (not merely unstarted)."""
    def waits() -> bool:
        return bool(db.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()").scalar())  # fmt: skip

    deadline = time.monotonic() + WAIT
    while not waits():
        assert time.monotonic() < deadline, "nothing waited on a lock"
        time.sleep(0.02)
    assert not waiting.done()


def command_all(engine: Engine, calls: list[UUID]) -> list[tuple[str, Outcome]]:
    """Complete, expire or attempt each call in turn (every third the same kind)."""
    kinds = ("complete", "expire", "add_attempt")
    outcomes = []
    for n, call in enumerate(calls):
        kind = kinds[n % 3]
        extra = {
            "complete": {"userUuid": str(uuid4()), "result": "reached"},
            "expire": {},
            "add_attempt": {"userUuid": str(uuid4()), "attemptedAt": "2026-03-01T09:00:00Z"},
        }[kind]
        command = parse_command(kind, {"callUuid": str(call), **extra})  # type: ignore[arg-type]
        outcomes.append((kind, handle(str(uuid4()), command, SqlUnitOfWork(engine))))
    return outcomes


@pytest.mark.scenario("sweep-command-race")
def test_sweep_and_commands_collide_many_times(
    db: Db, engine: Engine, reliability: Reliability
) -> None:
    """Rounds of a batched sweep against completes, expires and attempts on the same calls,
    all at their limit: each call ends in one end state, reached once."""
    overlapped = swept_first = commands_first = 0
    for _ in range(10):
        calls = exhausted_calls(db, 30)
        collision = collide(partial(sweep, engine, 3), partial(command_all, engine, calls))
        result, commands = collision.results
        overlapped += collision.overlapped
        # A call an attempt held while the sweep passed is left for the next sweep.
        next_sweep = sweep(engine)
        rows = [db.row(call) for call in calls]
        doubled = lost = 0
        expired_by_commands = 0
        for (kind, outcome), row in zip(commands, rows, strict=True):
            if row["status"] == "requested":
                lost += 1
            if kind == "complete" and outcome["ok"]:
                doubled += row["status"] != "completed" or row["expired_at"] is not None
            if kind == "expire" and outcome["ok"]:
                expired_by_commands += 1
        expired = sum(1 for row in rows if row["status"] == "expired")
        swept = result.expired + next_sweep.expired
        doubled += max(0, swept + expired_by_commands - expired)
        reliability.record("sweep-command-race", commands=len(calls), lost=lost, doubled=doubled)
        assert (lost, doubled) == (0, 0)
        for (kind, outcome), row in zip(commands, rows, strict=True):
            ended_by_command = {"complete": "completed", "expire": "expired"}.get(kind)
            if ended_by_command and outcome["ok"]:
                assert row["status"] == ended_by_command
            elif kind == "add_attempt" and outcome["ok"]:
                assert row["attempt_count"] == 2  # attempted first, then a sweep expired it
                assert row["status"] == "expired"
            else:
                assert outcome["error"]["code"] == "conflict"
                assert row["status"] == "expired"  # the sweep came first
                swept_first += 1
            commands_first += kind != "add_attempt" and outcome["ok"]
        assert swept + expired_by_commands == expired
        # Each change wrote exactly one event, in the order the changes happened.
        for call, (kind, outcome) in zip(calls, commands, strict=True):
            written = [(e["kind"], (e.get("expiry") or {}).get("by")) for e in db.events(call)]
            by_command = {"complete": ("call.completed", None),
                          "expire": ("call.expired", "command"),
                          "add_attempt": ("call.attempt_added", None)}[kind]  # fmt: skip
            swept_event = ("call.expired", "sweep")
            if outcome["ok"]:
                assert written == [by_command] + ([swept_event] if kind == "add_attempt" else [])
            else:
                assert written == [swept_event]
    # The two sides met: they ran at the same time, and each came first on some calls.
    assert overlapped >= 5
    assert swept_first > 0
    assert commands_first > 0


def test_two_sweeps_expire_each_call_once(db: Db, engine: Engine) -> None:
    both_expired = 0
    for _ in range(5):
        calls = exhausted_calls(db, 40)
        collision = collide(partial(sweep, engine, 4), partial(sweep, engine, 4))
        assert sum(r.expired for r in collision.results) == len(calls)
        assert {db.row(call)["status"] for call in calls} == {"expired"}
        both_expired += collision.overlapped and all(r.expired for r in collision.results)
    assert both_expired > 0  # the two sweeps did share the calls between them at least once


def test_a_second_sweep_does_not_wait_for_the_first(db: Db, engine: Engine) -> None:
    calls = exhausted_calls(db, 6)
    held = HeldUnitOfWork(engine)
    with ThreadPoolExecutor(1) as pool:
        first = in_thread(pool, lambda: sweep(engine, batch_size=4, uow=held))
        assert held.at_commit.wait(WAIT)
        assert sweep(engine, batch_size=4).expired == 2  # the 4 the first holds are skipped
        held.release.set()
        assert first.result(WAIT).expired == 4
    assert {db.row(call)["status"] for call in calls} == {"expired"}


def create_payload(db: Db, uuid: str) -> dict[str, Any]:
    organization = db.organization(3)
    return {"uuid": uuid, "personUuid": str(db.person(organization)),
            "organizationUuid": str(organization)}  # fmt: skip


@pytest.mark.parametrize("same_command", [False, True], ids=["two commands", "one redelivered"])
def test_two_creates_of_one_uuid_at_once(db: Db, engine: Engine, same_command: bool) -> None:
    uuid = str(uuid4())
    command = parse_command("create", create_payload(db, uuid))
    ids = ["cmd-a", "cmd-a" if same_command else "cmd-b"]
    held = HeldUnitOfWork(engine)
    with ThreadPoolExecutor(2) as pool:
        first = in_thread(pool, lambda: handle(ids[0], command, held))
        assert held.at_commit.wait(WAIT)
        second = in_thread(pool, lambda: handle(ids[1], command, SqlUnitOfWork(engine)))
        blocked_on_lock(db, second)  # on the first's uncommitted row
        held.release.set()
        outcomes = first.result(WAIT), second.result(WAIT)
    assert outcomes[0]["ok"] is True
    if same_command:
        assert outcomes[1] == outcomes[0]
    else:
        assert outcomes[1]["error"]["code"] == "conflict"
    assert db.sql("SELECT count(*) FROM calls WHERE uuid = :u", u=uuid).scalar() == 1


def test_two_creates_collide_many_times(db: Db, engine: Engine) -> None:
    overlapped = 0
    for _ in range(20):
        uuid = str(uuid4())
        command = parse_command("create", create_payload(db, uuid))
        collision = collide(
            partial(handle, "a" + uuid, command, SqlUnitOfWork(engine)),
            partial(handle, "b" + uuid, command, SqlUnitOfWork(engine)),
        )
        overlapped += collision.overlapped
        assert sorted(o["ok"] for o in collision.results) == [False, True]
        assert db.sql("SELECT count(*) FROM calls WHERE uuid = :u", u=uuid).scalar() == 1
    assert overlapped >= 10  # most rounds, the two creates ran at the same time


@pytest.mark.parametrize("by", ["api", "worker"])
def test_an_outcome_counts_the_attempt_it_waited_for(db: Db, engine: Engine, by: str) -> None:
    """An attempt is being added (by the API in plain SQL, or by another command) while a
    second attempt arrives: the second waits for the first's lock, and its outcome then
    shows both attempts, as the database holds them."""
    organization = db.organization(9)
    person = db.person(organization)
    call = db.call(person, organization)
    attempt = {"callUuid": str(call), "userUuid": str(uuid4()), "attemptedAt": ISSUED}
    with ThreadPoolExecutor(2) as pool:
        if by == "worker":
            held = HeldUnitOfWork(engine)
            first = in_thread(pool, lambda: handle(
                str(uuid4()), parse_command("add_attempt", attempt), held))  # fmt: skip
            assert held.at_commit.wait(WAIT)
        else:
            api = engine.connect()
            db_api = api.begin()
            api.execute(text("INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
                             " VALUES (:c, :u, now())"), {"c": call, "u": uuid4()})  # fmt: skip
        command = parse_command("add_attempt", attempt)
        second = in_thread(pool, lambda: handle(str(uuid4()), command, SqlUnitOfWork(engine)))
        blocked_on_lock(db, second)  # on the first's lock of the call
        if by == "worker":
            held.release.set()
            assert first.result(WAIT)["ok"] is True
        else:
            db_api.commit()
            api.close()
        outcome = second.result(WAIT)
    assert outcome["ok"] is True
    assert len(outcome["call"]["attempts"]) == db.attempt_rows(call) == 2
