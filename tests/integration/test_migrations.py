from __future__ import annotations

import threading

from sqlalchemy import inspect, text

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import (
    VERSION_TABLE,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)

TABLES = {
    "organizations",
    "persons",
    "pledge_cases",
    "calls",
    "call_attempts",
    "worker_processed_commands_a",
    "worker_processed_commands_b",
    "worker_processed_rotation",
    "worker_rejected_commands",
    "worker_sweep_runs",
    "worker_due_calls",
}


def test_empty_database_up_to_head_down_and_up_again(empty_database_url: str) -> None:
    engine = build_engine(empty_database_url, pool_size=1)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert TABLES | {VERSION_TABLE} <= set(inspect(engine).get_table_names())

        upgrade(engine)  # again: nothing to do, nothing breaks
        assert current_revision(engine) == head_revision()

        downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) & TABLES == set()
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_two_processes_migrating_at_once_take_turns(empty_database_url: str) -> None:
    errors: list[BaseException] = []

    def migrate() -> None:
        engine = build_engine(empty_database_url, pool_size=1)
        try:
            upgrade(engine)
        except BaseException as error:  # collected and asserted on below
            errors.append(error)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = build_engine(empty_database_url, pool_size=1)
    with engine.connect() as connection:
        versions = connection.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar()
    engine.dispose()
    assert versions == 1


def test_the_sweep_has_its_partial_index(empty_database_url: str) -> None:
    engine = build_engine(empty_database_url, pool_size=1)
    upgrade(engine)
    indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("calls")}
    engine.dispose()
    where = indexes["calls_requested_managed_idx"]["dialect_options"]["postgresql_where"]
    assert "requested" in where
    assert "external_metadata IS NULL" in where
