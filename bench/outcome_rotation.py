"""Forgetting command outcomes: a rotation of two tables (migration 0008) beside the
row-by-row DELETE it replaces, on the same rows, in the same run.

The baseline is the release before: one table with its ``processed_at`` index, pruned by
``DELETE … WHERE command_id IN (SELECT … WHERE processed_at < $1 LIMIT 10000)`` until
nothing is left, each batch its own transaction (that code is reproduced here). Both hold
``--rows`` outcomes past the retention and a tenth as many recent ones, each an outcome of
a create as the worker records it (≈ 1 KB of JSON). Measured: the time, the WAL written
and the tables' size before and after, to forget them, and for the DELETE the VACUUM it
leaves to autovacuum; then what the two tables cost each command — recording an outcome
(through the view and its trigger) and looking one up (in both tables) — beside the
single table, as the database's time for ``--statements`` single-row statements run by a
server-side loop (median of 3 rounds, alternating).

    python -m bench.outcome_rotation --rows 10000000 --fill-only   # once; ≈ 30 min here
    python -m bench.outcome_rotation --rows 10000000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, text

from bench.common import Row, median, on_filled_database, print_table, write_results
from calls_worker.adapters.db.journal import rotate_processed, set_processed_retention
from calls_worker.adapters.db.migrate import upgrade

# The table of the release before (migration 0001 and 0007), beside the worker's.
OLD_TABLE = """
CREATE TABLE bench_processed_old (
    command_id text PRIMARY KEY,
    kind text NOT NULL,
    call_uuid uuid NULL,
    outcome jsonb NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    service_account_uuid uuid NULL
);
CREATE INDEX bench_processed_old_processed_at_idx ON bench_processed_old (processed_at);
"""

# An outcome as a create records it: the call with its fields (≈ 1 KB as jsonb).
OUTCOME = """jsonb_build_object('ok', true, 'call', jsonb_build_object(
    'uuid', gen_random_uuid(), 'status', 'requested', 'type', 'verification',
    'personUuid', gen_random_uuid(), 'organizationUuid', gen_random_uuid(),
    'owningOrganizationUuid', gen_random_uuid(), 'pledgeCaseUuid', null,
    'requestedBy', gen_random_uuid(), 'result', null, 'completedBy', null,
    'notes', repeat(md5(n::text), 14), 'externalMetadata', null, 'attemptCount', 0,
    'attempts', '[]'::jsonb, 'createdAt', now(), 'updatedAt', now(), 'completedAt', null,
    'cancelledAt', null, 'expiredAt', null))"""


def fill(engine: Engine, table: str, first: int, count: int, age: str) -> None:
    with engine.begin() as connection:
        connection.execute(text(
            f"INSERT INTO {table} (command_id, kind, call_uuid, outcome, processed_at)"
            f" SELECT 'cmd-' || n, 'create', gen_random_uuid(), {OUTCOME},"
            f" now() - interval '{age}' - n * interval '1 millisecond'"
            f" FROM generate_series({first}, {first + count - 1}) n"))  # fmt: skip


def wal_position(engine: Engine) -> str:
    with engine.connect() as connection:
        return str(connection.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar())


def wal_since(engine: Engine, position: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(
            text("SELECT pg_current_wal_insert_lsn() - CAST(:p AS pg_lsn)"), {"p": position}
        ).scalar_one())  # fmt: skip


def checkpoint(engine: Engine) -> None:
    """So that neither side pays for the other's full-page images."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("CHECKPOINT"))


def costs(engine: Engine, action: Callable[[], Any]) -> tuple[float, int, Any]:
    """``action``'s seconds and WAL bytes after a checkpoint, and what it returned."""
    checkpoint(engine)
    position = wal_position(engine)
    started = time.perf_counter()
    value = action()
    seconds = time.perf_counter() - started
    return seconds, wal_since(engine, position), value


def vacuum_seconds(engine: Engine, table: str) -> float:
    """What the VACUUM after a DELETE takes (autovacuum's work, done here at once)."""
    started = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"VACUUM {table}"))
    return time.perf_counter() - started


def delete_old(engine: Engine, before_age: str, batch_size: int = 10_000) -> int:
    """The release before's prune, on the baseline table."""
    deleted = 0
    while True:
        with engine.begin() as connection:
            count = connection.execute(text(
                "DELETE FROM bench_processed_old WHERE command_id IN (SELECT command_id"
                " FROM bench_processed_old WHERE processed_at < now() - CAST(:age AS interval)"
                " LIMIT :n)"), {"age": before_age, "n": batch_size}).rowcount  # fmt: skip
        deleted += count
        if count < batch_size:
            return deleted


def server_loop(engine: Engine, statement: str, count: int) -> float:
    """The database's time for ``count`` runs of ``statement`` (``n`` is the run's number),
    each its own statement, in one server-side loop: seconds."""
    body = f"""
    DO $$
    DECLARE started timestamptz := clock_timestamp(); found int;
    BEGIN
        FOR n IN 1..{count} LOOP
            {statement};
        END LOOP;
        PERFORM set_config('bench.seconds',
            extract(epoch FROM clock_timestamp() - started)::text, true);
    END $$;
    """
    with engine.begin() as connection:
        connection.execute(text(body))
        seconds = connection.execute(text("SELECT current_setting('bench.seconds')")).scalar_one()
    return float(str(seconds))


def run(rows: int, statements: int, keep: bool = False) -> list[Row]:
    """``keep``: fill a database once (``calls_worker_bench_rotation_<rows>``) and leave it,
    filled, for a later run to measure (filling 10,000,000 takes half an hour here)."""
    return on_filled_database(f"calls_worker_bench_rotation_{rows}",
                              lambda engine: _fill(engine, rows),
                              lambda engine: _measure(engine, rows, statements), keep)


def _fill(engine: Engine, rows: int) -> None:
    upgrade(engine)
    recent = _recent(rows)
    with engine.begin() as connection:
        connection.execute(text(OLD_TABLE))
    started = time.perf_counter()
    print(f"  filling 2 × {rows + recent:,} outcomes", flush=True)
    fill(engine, "bench_processed_old", 1, rows, "4 days")
    fill(engine, "bench_processed_old", rows + 1, recent, "1 hour")
    # Straight into the tables (setting up, not measured): a, then b once a is previous.
    fill(engine, "worker_processed_commands_a", 1, rows, "4 days")
    set_processed_retention(engine, timedelta(0))  # every rotation is due at once
    rotate_processed(engine)  # a is previous now (b was empty: swapped)
    fill(engine, "worker_processed_commands_b", rows + 1, recent, "1 hour")
    print(f"  filled in {time.perf_counter() - started:.0f} s", flush=True)


def _recent(rows: int) -> int:
    return max(rows // 10, 1_000)


def table_bytes(engine: Engine, *tables: str) -> int:
    with engine.connect() as connection:
        return sum(int(connection.execute(
            text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": t}
        ).scalar_one()) for t in tables)  # fmt: skip


def _measure(engine: Engine, rows: int, statements: int) -> list[Row]:
    recent = _recent(rows)
    with engine.connect() as connection:
        average = "SELECT avg(pg_column_size(outcome)) FROM bench_processed_old"
        size = connection.execute(text(average)).scalar_one()
    print(f"  outcome {float(size):.0f} B", flush=True)
    new_tables = ("worker_processed_commands_a", "worker_processed_commands_b")
    sizes = {"old_before": table_bytes(engine, "bench_processed_old"),
             "new_before": table_bytes(engine, *new_tables)}  # fmt: skip

    delete_seconds, delete_wal, deleted = costs(engine, lambda: delete_old(engine, "72 hours"))
    vacuumed = vacuum_seconds(engine, "bench_processed_old")
    sizes["old_after"] = table_bytes(engine, "bench_processed_old")
    assert deleted == rows, deleted

    rotate_seconds, rotate_wal, rotation = costs(engine, lambda: rotate_processed(engine))
    sizes["new_after"] = table_bytes(engine, *new_tables)
    assert rotation.swapped
    with engine.connect() as connection:
        left = connection.execute(text("SELECT count(*) FROM worker_processed_commands")).scalar()
    assert left == recent, left
    gib = {k: round(v / 2**30, 2) for k, v in sizes.items()}
    print(f"  forgot {rows:,}: DELETE {delete_seconds:.1f} s (+ VACUUM {vacuumed:.1f} s),"
          f" {delete_wal / 2**20:.0f} MiB WAL; rotation {rotate_seconds * 1000:.1f} ms,"
          f" {rotate_wal / 2**10:.0f} KiB WAL; GiB {gib}", flush=True)  # fmt: skip
    # Per command: record an outcome, look one up (ids that exist in the older table).
    record_new = ("INSERT INTO worker_processed_commands (command_id, kind, outcome)"
                  " VALUES ('rec-' || n || '-' || {r}, 'create', '{{\"ok\": true}}')")  # fmt: skip
    record_old = ("INSERT INTO bench_processed_old (command_id, kind, outcome)"
                  " VALUES ('rec-' || n || '-' || {r}, 'create', '{{\"ok\": true}}')")  # fmt: skip
    look_new = ("SELECT 1 INTO found FROM worker_processed_commands"
                f" WHERE command_id = 'cmd-' || ({rows} + 1 + n % {recent})")  # fmt: skip
    look_old = ("SELECT 1 INTO found FROM bench_processed_old"
                f" WHERE command_id = 'cmd-' || ({rows} + 1 + n % {recent})")  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in ("rn", "ro", "ln", "lo")}
    for r in range(3):
        times["ro"].append(server_loop(engine, record_old.format(r=r), statements))
        times["rn"].append(server_loop(engine, record_new.format(r=r), statements))
        times["lo"].append(server_loop(engine, look_old, statements))
        times["ln"].append(server_loop(engine, look_new, statements))
    per = {k: median(v) / statements * 1e6 for k, v in times.items()}
    print(f"  per statement: record {per['rn']:.1f} µs (one table {per['ro']:.1f}),"
          f" look up {per['ln']:.1f} µs (one table {per['lo']:.1f})")  # fmt: skip

    details: dict[str, Any] = {"rows_forgotten": rows, "rows_kept": recent,
                               "outcome_bytes": round(float(size)), "table_gib": gib}  # fmt: skip
    return [
        Row("rotation", f"forget {rows:,} outcomes (rotation)", rotate_seconds, "s",
            "row-by-row DELETE (release before)", delete_seconds, "≤ 0.1×",
            rotate_seconds <= 0.1 * delete_seconds,
            details | {"delete_vacuum_seconds": round(vacuumed, 2)}),
        Row("rotation", f"WAL to forget {rows:,} outcomes", rotate_wal / 2**20, "MiB",
            "row-by-row DELETE (release before)", delete_wal / 2**20, "≤ 0.01×",
            rotate_wal <= 0.01 * delete_wal, details),
        Row("rotation", "record an outcome (database time)", per["rn"], "µs",
            "one table, no trigger", per["ro"], "≤ 0.2 ms more",
            per["rn"] - per["ro"] <= 200, {"statements": statements}),
        Row("rotation", "look an outcome up (database time)", per["ln"], "µs",
            "one table", per["lo"], "≤ 0.2 ms more",
            per["ln"] - per["lo"] <= 200, {"statements": statements}),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--no-write", action="store_true", help="Do not update results.json.")
    parser.add_argument("--fill-only", action="store_true",
                        help="Fill the database and keep it for a later run to measure.")
    arguments = parser.parse_args()
    rows = run(arguments.rows, arguments.statements, keep=arguments.fill_only)
    print_table(rows)
    if not arguments.no_write:
        write_results(rows)


if __name__ == "__main__":
    main()
