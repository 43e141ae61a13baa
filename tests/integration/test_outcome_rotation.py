"""Outcome records forgotten a table at a time (migration 0008), with "applied once" exact
across both tables, and never a row deleted one by one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.journal import (
    Rotation,
    processed_outcome,
    rotate_processed,
    set_processed_retention,
)
from calls_worker.adapters.db.migrate import downgrade, upgrade
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import BatchEntry, handle, handle_batch
from tests.db_world import ISSUED, Db

NOW = timedelta(0)  # a rotation due at once


def rotate(engine: Engine, keep: timedelta) -> Rotation:
    """A rotation by the retention ``keep``, set first as the owner sets it (`migrate`)."""
    set_processed_retention(engine, keep)
    return rotate_processed(engine)


@pytest.fixture
def world(db: Db) -> tuple[UUID, UUID]:
    organization = db.organization(3)
    return organization, db.person(organization)


def create(world: tuple[UUID, UUID], call: str) -> dict[str, Any]:
    organization, person = world
    return {"uuid": call, "personUuid": str(person), "organizationUuid": str(organization),
            "issuedAt": ISSUED}  # fmt: skip


def single(db: Db, command_id: str, payload: dict[str, Any]) -> Outcome:
    return handle(command_id, parse_command("create", payload), SqlUnitOfWork(db.engine))


def batched(db: Db, command_id: str, payload: dict[str, Any]) -> Outcome:
    # Between two other commands, so that the batch is one and not a lone command.
    entries = [BatchEntry(str(uuid4()), parse_command("create", {**payload, "uuid": str(uuid4())}))
               for _ in range(2)]  # fmt: skip
    entries.insert(1, BatchEntry(command_id, parse_command("create", payload)))
    outcome = handle_batch(entries, lambda: SqlUnitOfWork(db.engine)).outcomes[1]
    assert outcome is not None
    return outcome


def table_of(db: Db, command_id: str) -> list[str]:
    return list(db.sql(
        "SELECT 'a' FROM worker_processed_commands_a WHERE command_id = :c"
        " UNION ALL SELECT 'b' FROM worker_processed_commands_b WHERE command_id = :c",
        c=command_id).scalars())  # fmt: skip


def test_a_rotation_waits_until_the_current_table_has_been_current_for_the_retention(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    single(db, "kept", create(world, str(uuid4())))
    rotation = rotate(db.engine, timedelta(hours=1))
    assert not rotation.swapped
    assert table_of(db, "kept") == ["a"]
    db.sql("UPDATE worker_processed_rotation SET current_since = now() - interval '61 minutes'")
    assert rotate(db.engine, timedelta(hours=1)).swapped
    assert table_of(db, "kept") == ["a"]  # previous now: kept for another hour at least
    assert not rotate(db.engine, timedelta(hours=1)).swapped  # b is young
    assert table_of(db, "kept") == ["a"]


@pytest.mark.parametrize("send", [single, batched], ids=["single", "batch"])
def test_a_redelivery_of_an_outcome_in_the_oldest_kept_table_gets_its_first_outcome(
    db: Db, world: tuple[UUID, UUID], send: Callable[[Db, str, dict[str, Any]], Outcome]
) -> None:
    call = str(uuid4())
    first = send(db, "oldest", create(world, call))
    assert first["ok"] is True
    assert rotate(db.engine, NOW).swapped
    assert table_of(db, "oldest") == ["a"]  # the previous table: the oldest kept
    calls_before = db.sql("SELECT count(*) FROM calls").scalar()

    again = send(db, "oldest", create(world, call))
    other_body = send(db, "oldest", create(world, str(uuid4())))  # same id, another call

    assert again == first
    assert other_body == first
    assert table_of(db, "oldest") == ["a"]  # not recorded again in the current table
    # the batched sender adds two new calls of its own each time
    new_calls = 0 if send is single else 4
    assert db.sql("SELECT count(*) FROM calls").scalar() == calls_before + new_calls


def test_the_second_rotation_forgets_the_oldest_and_keeps_the_newer(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    single(db, "old", create(world, str(uuid4())))
    rotate(db.engine, NOW)
    newer = single(db, "newer", create(world, str(uuid4())))
    assert table_of(db, "newer") == ["b"]

    rotation = rotate(db.engine, NOW)

    assert rotation.swapped
    assert table_of(db, "old") == []  # past the retention: a command id may be used again
    assert processed_outcome(db.engine, "old") is None
    assert table_of(db, "newer") == ["b"]
    assert processed_outcome(db.engine, "newer")["outcome"] == newer  # type: ignore[index]
    assert single(db, "newest", create(world, str(uuid4())))["ok"]
    assert table_of(db, "newest") == ["a"]


def test_forgetting_is_a_truncate_not_a_delete_of_each_row(db: Db) -> None:
    """Measured by the WAL each writes: a rotation's is a few kilobytes whatever the rows; a
    DELETE of the same rows writes each of them (bench/outcome_rotation.py has the times)."""
    fill = (
        "INSERT INTO worker_processed_commands (command_id, kind, outcome)"
        " SELECT 'fill-' || n, 'create', '{\"ok\": true}' FROM generate_series(1, 20000) n"
    )
    db.sql(fill)
    rotate(db.engine, NOW)  # the 20,000 are previous now
    rotated = wal_written(db.engine, lambda: rotate(db.engine, NOW))
    assert db.sql("SELECT count(*) FROM worker_processed_commands").scalar() == 0
    db.sql(fill)  # into the current table, a
    deleted = wal_written(db.engine, lambda: db.sql("DELETE FROM worker_processed_commands_a"))
    assert rotated * 20 < deleted, (rotated, deleted)


def wal_written(engine: Engine, action: Callable[[], object]) -> int:
    with engine.connect() as connection:
        before = connection.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar()
        action()
        written = connection.execute(
            text("SELECT pg_current_wal_insert_lsn() - CAST(:b AS pg_lsn)"), {"b": before}
        ).scalar_one()
        return int(written)


def insert(connection: Any, command_id: str) -> None:
    connection.execute(
        "INSERT INTO worker_processed_commands (command_id, kind, outcome)"
        " VALUES (%s, 'create', '{}')", (command_id,))  # fmt: skip


def test_a_swap_waits_for_the_writes_of_its_turn_so_a_duplicate_is_never_missed(
    database_url: str, db: Db
) -> None:
    """A first delivery still running in the old turn, the swap, and a second delivery in
    the new turn: the second waits for the first and is refused, though their records are
    in different tables (without the turn's lock, both would be applied)."""
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    first = psycopg.connect(url)
    second = psycopg.connect(url, autocommit=True)
    insert(first, "twice")  # a transaction of the old turn, not committed
    swapped: list[object] = []
    second_ends: list[BaseException | None] = []

    def swap() -> None:
        swapped.append(rotate(db.engine, NOW).swapped)

    def deliver_again() -> None:
        try:
            insert(second, "twice")
            second_ends.append(None)
        except psycopg.errors.UniqueViolation as error:
            second_ends.append(error)

    rotating = threading.Thread(target=swap)
    again = threading.Thread(target=deliver_again)
    try:
        rotating.start()
        wait_until(lambda: swapped or waiting_on_advisory_locks(db) == 1)
        again.start()
        wait_until(lambda: second_ends or waiting_on_advisory_locks(db) == 2)
        first.commit()
        rotating.join(10)
        again.join(10)
    finally:
        first.close()  # else the test's clean-up would wait for its locks
        second.close()

    assert swapped == [True]
    assert table_of(db, "twice") == ["a"]  # once: the second delivery was refused
    assert isinstance(second_ends[0], psycopg.errors.UniqueViolation)
    assert second_ends[0].diag.constraint_name == "worker_processed_commands_pkey"  # a's
    with psycopg.connect(url, autocommit=True) as third:
        insert(third, "next")  # the new turn writes the new table
    assert table_of(db, "next") == ["b"]


def waiting_on_advisory_locks(db: Db) -> int:
    waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"
    return int(db.sql(waiting).scalar())


def wait_until(done: Callable[[], object]) -> None:
    for _ in range(500):
        if done():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the transactions neither waited nor ended")


def test_an_upgrade_keeps_the_outcomes_recorded_before_it_and_a_downgrade_both_tables(
    empty_database_url: str,
) -> None:
    engine = build_engine(empty_database_url, pool_size=2)
    try:
        upgrade(engine, "0007")
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO worker_processed_commands (command_id, kind, outcome)"
                " VALUES ('before', 'create', '{\"ok\": true}')"))  # fmt: skip
        upgrade(engine)
        db = Db(engine)
        assert table_of(db, "before") == ["a"]
        with pytest.raises(Exception, match="worker_processed_commands_pkey"):
            db.sql("INSERT INTO worker_processed_commands (command_id, kind, outcome)"
                   " VALUES ('before', 'create', '{}')")  # fmt: skip
        rotate(engine, NOW)
        db.sql("INSERT INTO worker_processed_commands (command_id, kind, outcome)"
               " VALUES ('after', 'create', '{}')")  # fmt: skip
        with pytest.raises(Exception, match="worker_processed_commands_pkey"):
            db.sql("INSERT INTO worker_processed_commands (command_id, kind, outcome)"
                   " VALUES ('before', 'create', '{}')")  # fmt: skip

        downgrade(engine, "0007")
        kept = db.sql("SELECT command_id FROM worker_processed_commands ORDER BY 1").scalars()
        assert list(kept) == ["after", "before"]
    finally:
        engine.dispose()


def test_a_rotation_gives_up_after_two_seconds_behind_a_reader_and_changes_nothing(
    database_url: str, db: Db, world: tuple[UUID, UUID]
) -> None:
    """A transaction that read the previous table holds its lock: the TRUNCATE waits at
    most lock_timeout (2 s), then the rotation fails (calls.prune logs it as busy) and
    the outcomes and the turn are as they were."""
    single(db, "held", create(world, str(uuid4())))
    rotate(db.engine, NOW)  # "held" is in the previous table now
    the_turn = "SELECT current_table, current_since FROM worker_processed_rotation"
    turn = db.sql(the_turn).one()
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    reader = psycopg.connect(url)
    try:
        reader.execute("SELECT count(*) FROM worker_processed_commands")  # a lookup, open
        with pytest.raises(OperationalError) as refused:
            rotate(db.engine, NOW)
        assert isinstance(refused.value.orig, psycopg.errors.LockNotAvailable)
    finally:
        reader.close()
    assert table_of(db, "held") == ["a"]
    assert db.sql(the_turn).one() == turn
