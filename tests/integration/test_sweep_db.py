"""The SQL sweep against the same table of cases as the policy (through the worker's sweep
task, as beat runs it), and its bounds."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine

from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.config import Settings
from calls_worker.service.sweep import SweepResult, expire_exhausted_calls
from calls_worker.worker.runtime import Runtime
from calls_worker.worker.tasks import run_sweep
from tests.db_world import Db
from tests.expiry_cases import EXPIRY_CASES, ExpiryCase

NOW = datetime(2026, 4, 1, 6, 0, tzinfo=UTC)


def sweep(engine: Engine, batch_size: int = 100) -> SweepResult:
    return expire_exhausted_calls(lambda: SqlUnitOfWork(engine), NOW, batch_size)


def case_call(db: Db, case: ExpiryCase) -> UUID:
    person = db.person(db.organization(case.max_call_attempts))
    return db.call(
        person,
        db.organization(case.performing_max),
        status=case.status.value,
        external=case.external,
        attempts=case.attempts,
    )


def worker_sweep(database_url: str) -> int:
    """One sweep as the worker's task runs it (its lock, its record, its events); how many
    calls it expired."""
    runtime = Runtime(database_url, Settings())
    try:
        with freeze_time(NOW):
            report = run_sweep(runtime)
    finally:
        runtime.dispose()
    assert not report["skipped"]
    return int(report["expired"])


@pytest.mark.parametrize("case", EXPIRY_CASES, ids=lambda c: c.name)
def test_sql_sweep_follows_the_table(db: Db, database_url: str, case: ExpiryCase) -> None:
    call = case_call(db, case)
    before = db.row(call)
    assert worker_sweep(database_url) == int(case.expires)
    after = db.row(call)
    if case.expires:
        assert (after["status"], after["expired_at"], after["updated_at"]) == ("expired", NOW, NOW)
        for field in ("status", "expired_at", "updated_at"):
            del before[field], after[field]
    assert after == before  # nothing else touched


def test_all_cases_in_one_sweep(db: Db, engine: Engine) -> None:
    calls = {case.name: case_call(db, case) for case in EXPIRY_CASES}
    result = sweep(engine, batch_size=2)
    assert result.expired == sum(case.expires for case in EXPIRY_CASES)
    for case in EXPIRY_CASES:
        expired_now = db.row(calls[case.name])["expired_at"] == NOW
        assert expired_now is case.expires, case.name
    assert sweep(engine).expired == 0


def test_a_lowered_maximum_takes_effect_on_the_next_sweep(db: Db, engine: Engine) -> None:
    organization = db.organization(5)
    call = db.call(db.person(organization), organization, attempts=3)
    assert sweep(engine).expired == 0
    db.sql("UPDATE organizations SET max_call_attempts = 3 WHERE uuid = :o", o=organization)
    assert sweep(engine).expired == 1
    assert db.row(call)["status"] == "expired"


def test_batches_until_nothing_is_due(db: Db, engine: Engine) -> None:
    organization = db.organization(1)
    person = db.person(organization)
    for _ in range(11):
        db.call(person, organization, attempts=1)
    result = sweep(engine, batch_size=4)
    assert (result.expired, result.batches) == (11, 3)


def test_a_call_locked_by_a_command_is_left_for_the_next_sweep(db: Db, engine: Engine) -> None:
    organization = db.organization(1)
    person = db.person(organization)
    locked, free = (db.call(person, organization, attempts=1) for _ in range(2))
    with engine.connect() as holder:
        holder.exec_driver_sql("SELECT 1 FROM calls WHERE uuid = %s FOR UPDATE", (locked,))
        assert sweep(engine).expired == 1  # it did not wait for the lock
        assert db.row(free)["status"] == "expired"
        assert db.row(locked)["status"] == "requested"
        holder.rollback()
    assert sweep(engine).expired == 1
    assert db.row(locked)["status"] == "expired"


def test_a_sweep_says_how_many_it_expired_for_each_owning_organization(
    db: Db, engine: Engine
) -> None:
    first, second, performer = db.organization(1), db.organization(2), db.organization(None)
    calls_of_first = [db.call(db.person(first), performer, attempts=1) for _ in range(2)]
    call_of_second = db.call(db.person(second), performer, attempts=2)
    db.call(db.person(second), performer, attempts=1)  # not due

    result = expire_exhausted_calls(lambda: SqlUnitOfWork(engine), NOW, 1)

    assert result.by_organization == {str(first): 2, str(second): 1}  # owners, not the performer
    assert sorted(result.expired_calls) == sorted([*calls_of_first, call_of_second])
