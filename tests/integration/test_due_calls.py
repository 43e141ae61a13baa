"""worker_due_calls, kept by triggers, always lists exactly the calls the policy says are due."""

from __future__ import annotations

import random
from uuid import UUID

from sqlalchemy import Engine, select

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import downgrade, upgrade
from calls_worker.adapters.db.sweep import calls_with_owning_organization, exhausted
from calls_worker.adapters.db.tables import calls
from calls_worker.domain.model import CallStatus
from calls_worker.domain.policy import is_exhausted
from tests.db_world import Db


def due_by_policy(engine: Engine) -> set[UUID]:
    """The calls ``domain.policy.is_exhausted`` says are due, from the raw rows: attempts
    counted row by row (not from ``attempt_count``), the maximum of the person's owner."""
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT c.uuid, c.status, c.external_metadata IS NOT NULL AS external,"
            " (SELECT count(*) FROM call_attempts a WHERE a.call_uuid = c.uuid) AS attempts,"
            " o.max_call_attempts FROM calls c JOIN persons p ON p.uuid = c.person_uuid"
            " JOIN organizations o ON o.uuid = p.owning_organization_uuid"
        ).all()
    return {
        row.uuid
        for row in rows
        if is_exhausted(status=CallStatus(row.status), is_external=row.external,
                        attempt_count=row.attempts, max_call_attempts=row.max_call_attempts)
    }  # fmt: skip


def due_by_sql_twin(engine: Engine) -> set[UUID]:
    """The same, by the sweep's SQL condition (``sweep.exhausted``)."""
    with engine.connect() as connection:
        query = (
            select(calls.c.uuid).select_from(calls_with_owning_organization()).where(exhausted())
        )
        return set(connection.execute(query).scalars())


def due_by_table(db: Db) -> set[UUID]:
    return set(db.sql("SELECT call_uuid FROM worker_due_calls").scalars())


def test_the_due_table_follows_every_kind_of_change(db: Db, engine: Engine) -> None:
    rng = random.Random(20261127)
    organizations = [db.organization(rng.choice([1, 2, 3, None])) for _ in range(4)]
    persons = [db.person(rng.choice(organizations)) for _ in range(8)]
    call_ids = [db.call(rng.choice(persons), organizations[0]) for _ in range(20)]

    def add_attempt() -> None:
        db.plain_attempt(rng.choice(call_ids))

    def remove_attempt() -> None:
        db.sql("DELETE FROM call_attempts WHERE uuid = (SELECT uuid FROM call_attempts"
               " WHERE call_uuid = :c LIMIT 1)", c=rng.choice(call_ids))  # fmt: skip

    def change_status() -> None:
        db.sql("UPDATE calls SET status = :s WHERE uuid = :c", c=rng.choice(call_ids),
               s=rng.choice(["requested", "completed", "cancelled", "expired"]))  # fmt: skip

    def toggle_external() -> None:
        db.sql("UPDATE calls SET external_metadata = CASE WHEN external_metadata IS NULL"
               " THEN '{}'::jsonb END WHERE uuid = :c", c=rng.choice(call_ids))  # fmt: skip

    def change_maximum() -> None:
        db.sql("UPDATE organizations SET max_call_attempts = :m WHERE uuid = :o",
               o=rng.choice(organizations), m=rng.choice([1, 2, 3, 5, None]))  # fmt: skip

    def rename_organization() -> None:
        db.sql("UPDATE organizations SET name = 'renamed' WHERE uuid = :o",
               o=rng.choice(organizations))  # fmt: skip

    def move_person() -> None:
        db.sql("UPDATE persons SET owning_organization_uuid = :o WHERE uuid = :p",
               p=rng.choice(persons), o=rng.choice(organizations))  # fmt: skip

    def move_attempt() -> None:
        db.sql("UPDATE call_attempts SET call_uuid = :c WHERE uuid = (SELECT uuid FROM"
               " call_attempts ORDER BY random() LIMIT 1)", c=rng.choice(call_ids))  # fmt: skip

    def truncate_attempts() -> None:
        db.sql("TRUNCATE call_attempts")

    def move_call() -> None:
        db.sql("UPDATE calls SET person_uuid = :p WHERE uuid = :c",
               c=rng.choice(call_ids), p=rng.choice(persons))  # fmt: skip

    changes = [
        *[add_attempt] * 3,
        remove_attempt,
        change_status,
        toggle_external,
        change_maximum,
        rename_organization,
        move_person,
        move_call,
        move_attempt,
        truncate_attempts,
    ]
    done: set[str] = set()
    reached_due = 0
    for step in range(400):
        change = rng.choice(changes)
        change()
        done.add(change.__name__)
        by_policy = due_by_policy(engine)
        assert due_by_table(db) == by_policy, f"after step {step}: {change.__name__}"
        assert due_by_sql_twin(engine) == by_policy
        reached_due += bool(by_policy)
    assert reached_due > 40  # the walk spent time among due calls (61 steps, seeded)
    assert done == {change.__name__ for change in changes}  # and took every kind of step


def test_upgrading_records_what_is_due_already(empty_database_url: str) -> None:
    engine = build_engine(empty_database_url, pool_size=2)
    try:
        upgrade(engine, "0002")
        db = Db(engine)
        organization = db.organization(2)
        person = db.person(organization)
        due = db.call(person, organization, attempts=2)
        db.call(person, organization, attempts=1)
        upgrade(engine)
        assert due_by_table(db) == {due} == due_by_policy(engine)
        downgrade(engine, "0002")
        upgrade(engine)
        assert due_by_table(db) == {due}
    finally:
        engine.dispose()
