"""Forgetting call events: hourly partitions dropped whole (migration 0013) beside the
row-by-row DELETE they replace, on the same rows, in the same run.

The baseline is the release before: one table (0010's, with its BRIN index on
``recorded_at``), pruned by ``DELETE … WHERE seq = ANY(ARRAY(SELECT seq … LIMIT 10000))``
until nothing is left, each batch its own transaction (that code is reproduced here). Both
hold ``--rows`` events published past the retention, recorded 1,000 a second (so 10
million fill 2.8 hours: three hourly partitions), and a tenth as many recent ones; each an
add-attempt's event as the worker writes it (≈ 1 KB with its call). Measured: the time and
the WAL to forget them (and for the DELETE, the VACUUM it leaves to autovacuum), and what
each event costs — a command's INSERT, as the database's time for ``--statements``
single-row statements run by a server-side loop, and the relay's mark of it, in batches of
500 as a relay round makes them (median of 3 rounds, alternating); and the longest that
an event's write waited while each prune ran (a writer inserting one after another: the
partitions' creation and drops lock the table). And what 0013 costs on
an outbox of that size: the scan that checks the old table's bound and the build of its
new key.

    python -m bench.event_partitions --rows 10000000 --fill-only   # once
    python -m bench.event_partitions --rows 10000000
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from bench.common import Row, median, on_filled_database, print_table, write_results
from bench.outcome_rotation import costs, server_loop, table_bytes, vacuum_seconds
from calls_worker.adapters.db.events import prune_published, set_events_retention
from calls_worker.adapters.db.migrate import upgrade

# The table of the release before (migration 0010), beside the worker's.
OLD_TABLE = """
CREATE TABLE bench_events_old (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL,
    kind text NOT NULL,
    occurred_at timestamptz NOT NULL,
    call_uuid uuid NOT NULL,
    organization_uuid uuid NOT NULL,
    owning_organization_uuid uuid NULL,
    call json NOT NULL,
    expiry json NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz NULL
);
CREATE INDEX bench_events_old_unpublished_idx ON bench_events_old (seq)
    WHERE published_at IS NULL;
CREATE INDEX bench_events_old_call_idx ON bench_events_old (call_uuid, seq);
CREATE INDEX bench_events_old_recorded_idx ON bench_events_old USING brin (recorded_at);
"""

# An add-attempt's call as its event carries it (≈ 1 KB with the row).
CALL = """json_build_object(
    'uuid', gen_random_uuid(), 'status', 'requested', 'type', 'verification',
    'personUuid', gen_random_uuid(), 'organizationUuid', gen_random_uuid(),
    'owningOrganizationUuid', gen_random_uuid(), 'pledgeCaseUuid', null,
    'requestedBy', gen_random_uuid(), 'result', null, 'completedBy', null,
    'notes', repeat(md5(n::text), 8), 'externalMetadata', null, 'attemptCount', 2,
    'attempts', json_build_array(json_build_object('userUuid', gen_random_uuid(),
        'attemptedAt', now()), json_build_object('userUuid', gen_random_uuid(),
        'attemptedAt', now())),
    'createdAt', now(), 'updatedAt', now(), 'completedAt', null,
    'cancelledAt', null, 'expiredAt', null)"""
COLUMNS = ("event_id, kind, occurred_at, call_uuid, organization_uuid,"
           " owning_organization_uuid, call, recorded_at, published_at")  # fmt: skip


SHAPES = 10_000  # distinct calls the events carry, made once (building JSON is the slow part)


def fill(engine: Engine, table: str, start: datetime, first: int, count: int) -> None:
    """``count`` published events recorded 1 ms apart from ``start``, in chunks; each with
    ids of its own and one of SHAPES calls (bench_calls, made on first use)."""
    with engine.begin() as connection:
        connection.execute(text(
            "CREATE TABLE IF NOT EXISTS bench_calls AS SELECT n, " + CALL + " AS call"
            f" FROM generate_series(0, {SHAPES - 1}) n"))  # fmt: skip
    chunk = 1_000_000
    for low in range(first, first + count, chunk):
        high = min(low + chunk, first + count) - 1
        with engine.begin() as connection:
            connection.execute(text(
                f"INSERT INTO {table} ({COLUMNS}) SELECT gen_random_uuid(),"
                " 'call.attempt_added', at, gen_random_uuid(), gen_random_uuid(),"
                " gen_random_uuid(), c.call, at, at + interval '1 second'"
                f" FROM generate_series({low}, {high}) g(n)"
                f" JOIN bench_calls c ON c.n = g.n % {SHAPES},"
                " LATERAL (SELECT CAST(:start AS timestamptz)"
                f" + (g.n - {first}) * interval '1 millisecond' AS at) t ORDER BY g.n"),
                {"start": start})  # fmt: skip


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    hour = start.replace(minute=0, second=0, microsecond=0)
    hours = []
    while hour < end:
        hours.append(hour)
        hour += timedelta(hours=1)
    return hours


def make_partitions(engine: Engine, start: datetime, end: datetime) -> None:
    """The hourly partitions the prune made ahead when those hours were to come."""
    with engine.begin() as connection:
        for hour in hours_between(start, end):
            connection.execute(text(
                f"CREATE TABLE IF NOT EXISTS worker_call_events_{hour:%Y%m%d%H} PARTITION OF"
                f" worker_call_events FOR VALUES FROM ('{hour.isoformat()}')"
                f" TO ('{(hour + timedelta(hours=1)).isoformat()}')"))  # fmt: skip


def delete_old(engine: Engine, keep: timedelta, batch: int = 10_000) -> int:
    """The release before's prune (0010's events.prune_published), on the baseline table."""
    deleted = 0
    while True:
        with engine.begin() as connection:
            count = connection.execute(text(
                "DELETE FROM bench_events_old WHERE seq = ANY(ARRAY("
                " SELECT seq FROM bench_events_old WHERE recorded_at < now() - :keep"
                " AND published_at < now() - :keep LIMIT :batch))"),
                {"keep": keep, "batch": batch}).rowcount  # fmt: skip
        deleted += count
        if count < batch:
            return deleted


def run(rows: int, statements: int, keep: bool = False) -> list[Row]:
    """``keep``: fill a database once (``calls_worker_bench_events_<rows>``) and leave it,
    filled, for a later run to measure."""
    return on_filled_database(f"calls_worker_bench_events_{rows}",
                              lambda engine: _fill(engine, rows),
                              lambda engine: _measure(engine, rows, statements), keep)


def _old_start(rows: int) -> datetime:
    """Four days ago, on the hour: rows * 1 ms from there stays past a 72 h retention."""
    return (datetime.now(UTC) - timedelta(days=4)).replace(minute=0, second=0, microsecond=0)


def _fill(engine: Engine, rows: int) -> None:
    upgrade(engine)
    recent = max(rows // 10, 1_000)
    old_start = _old_start(rows)
    old_end = old_start + rows * timedelta(milliseconds=1)
    recent_start = datetime.now(UTC) - timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(text(OLD_TABLE))
    make_partitions(engine, old_start, old_end)
    make_partitions(engine, recent_start, recent_start + recent * timedelta(milliseconds=1))
    started = time.perf_counter()
    print(f"  filling 2 × {rows + recent:,} events", flush=True)
    fill(engine, "bench_events_old", old_start, 1, rows)
    fill(engine, "bench_events_old", recent_start, rows + 1, recent)
    with engine.begin() as connection:  # the same rows, routed to their hours' partitions
        connection.execute(text(
            f"INSERT INTO worker_call_events ({COLUMNS})"
            f" SELECT {COLUMNS} FROM bench_events_old ORDER BY seq"))  # fmt: skip
    print(f"  filled in {time.perf_counter() - started:.0f} s", flush=True)


def _measure(engine: Engine, rows: int, statements: int) -> list[Row]:
    recent = max(rows // 10, 1_000)
    keep = timedelta(hours=72)
    set_events_retention(engine, keep)
    with engine.connect() as connection:
        size = connection.execute(text(
            "SELECT avg(pg_column_size(e.*)) FROM (SELECT * FROM bench_events_old LIMIT 10000) e"
        )).scalar_one()  # fmt: skip
    print(f"  event row {float(size):.0f} B", flush=True)
    sizes = {"old_before": table_bytes(engine, "bench_events_old"),
             "new_before": _partitioned_bytes(engine)}  # fmt: skip

    # What 0013 adds on an outbox this size: the bound's scan and the new key's build.
    started = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE bench_events_old ADD CONSTRAINT bench_bound"
                                " CHECK (recorded_at < now() + interval '1 hour')"))  # fmt: skip
    bound_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(text("CREATE UNIQUE INDEX bench_events_old_key"
                                " ON bench_events_old (seq, recorded_at)"))  # fmt: skip
    key_seconds = time.perf_counter() - started
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX bench_events_old_key"))
        connection.execute(text("ALTER TABLE bench_events_old DROP CONSTRAINT bench_bound"))
    print(f"  0013 on {rows + recent:,} events: bound {bound_seconds:.1f} s,"
          f" key {key_seconds:.1f} s", flush=True)  # fmt: skip

    with Writer(engine, "bench_events_old") as old_writer:
        delete_seconds, delete_wal, deleted = costs(engine, lambda: delete_old(engine, keep))
    vacuumed = vacuum_seconds(engine, "bench_events_old")
    sizes["old_after"] = table_bytes(engine, "bench_events_old")
    assert deleted == rows, deleted

    with Writer(engine, "worker_call_events") as new_writer:
        drop_seconds, drop_wal, pruned = costs(engine, lambda: prune_published(engine))
    print(f"  a writer's longest wait: {new_writer.longest * 1000:.0f} ms during the prune"
          f" ({new_writer.writes} writes), {old_writer.longest * 1000:.0f} ms during the"
          f" DELETE ({old_writer.writes})", flush=True)  # fmt: skip
    sizes["new_after"] = _partitioned_bytes(engine)
    with engine.connect() as connection:
        left = connection.execute(text("SELECT count(*) FROM worker_call_events")).scalar()
    assert left == recent + new_writer.writes, (left, pruned)
    gib = {k: round(v / 2**30, 2) for k, v in sizes.items()}
    print(f"  forgot {rows:,}: DELETE {delete_seconds:.1f} s (+ VACUUM {vacuumed:.1f} s),"
          f" {delete_wal / 2**20:.0f} MiB WAL; dropping {pruned.dropped} partitions"
          f" {drop_seconds * 1000:.1f} ms, {drop_wal / 2**10:.0f} KiB WAL; GiB {gib}",
          flush=True)  # fmt: skip

    insert = ("INSERT INTO {table} (event_id, kind, occurred_at, call_uuid, organization_uuid,"
              " owning_organization_uuid, call) SELECT gen_random_uuid(), 'call.attempt_added',"
              " now(), gen_random_uuid(), gen_random_uuid(), gen_random_uuid(),"
              f" {CALL}")  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in ("in", "io", "mn", "mo")}
    for _ in range(3):
        times["io"].append(server_loop(engine, insert.format(table="bench_events_old"),
                                       statements))  # fmt: skip
        times["in"].append(server_loop(engine, insert.format(table="worker_call_events"),
                                       statements))  # fmt: skip
        times["mo"].append(mark_loop(engine, "bench_events_old", by_time=False) * statements)
        times["mn"].append(mark_loop(engine, "worker_call_events", by_time=True) * statements)
    per = {k: median(v) / statements * 1e6 for k, v in times.items()}
    print(f"  per statement: write an event {per['in']:.1f} µs (one table {per['io']:.1f}),"
          f" mark one {per['mn']:.1f} µs (one table {per['mo']:.1f})")  # fmt: skip

    details: dict[str, Any] = {
        "rows_forgotten": rows, "rows_kept": recent, "event_row_bytes": round(float(size)),
        "table_gib": gib, "partitions_dropped": pruned.dropped,
        "upgrade_0013_bound_seconds": round(bound_seconds, 1),
        "upgrade_0013_key_seconds": round(key_seconds, 1),
        "writer_longest_wait_ms": round(new_writer.longest * 1000, 1),
        "writer_longest_wait_ms_delete": round(old_writer.longest * 1000, 1),
    }  # fmt: skip
    return [
        Row("events", f"forget {rows:,} events (partitions dropped)", drop_seconds, "s",
            "row-by-row DELETE (release before)", delete_seconds, "≤ 0.1×",
            drop_seconds <= 0.1 * delete_seconds,
            details | {"delete_vacuum_seconds": round(vacuumed, 2)}),
        Row("events", f"WAL to forget {rows:,} events", drop_wal / 2**20, "MiB",
            "row-by-row DELETE (release before)", delete_wal / 2**20, "≤ 0.01×",
            drop_wal <= 0.01 * delete_wal, details),
        Row("events", "write an event (database time)", per["in"], "µs",
            "one table (release before)", per["io"], "≤ 0.1 ms more",
            per["in"] - per["io"] <= 100, {"statements": statements}),
        Row("events", "mark an event published (database time)", per["mn"], "µs",
            "one table (release before)", per["mo"], "≤ 0.1 ms more",
            per["mn"] - per["mo"] <= 100, {"statements": statements}),
    ]  # fmt: skip


class Writer(threading.Thread):
    """A command's event write, one after the other into ``table`` while the prune runs:
    the longest any one waited (for the prune's locks) is what a command waits."""

    def __init__(self, engine: Engine, table: str) -> None:
        super().__init__(daemon=True)
        self.engine, self.table = engine, table
        self.stop = threading.Event()
        self.longest, self.writes = 0.0, 0

    def __enter__(self) -> Writer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()

    def run(self) -> None:
        insert = text(
            f"INSERT INTO {self.table} (event_id, kind, occurred_at, call_uuid,"
            " organization_uuid, call) VALUES (gen_random_uuid(), 'call.attempt_added', now(),"
            " gen_random_uuid(), gen_random_uuid(), '{}')")  # fmt: skip
        with self.engine.connect() as connection:
            while not self.stop.is_set():
                started = time.perf_counter()
                connection.execute(insert)
                connection.commit()
                self.longest = max(self.longest, time.perf_counter() - started)
                self.writes += 1
                time.sleep(0.005)


def mark_loop(engine: Engine, table: str, *, by_time: bool, batch: int = 500) -> float:
    """The relay's marks of every unpublished event of ``table``, ``batch`` a statement as
    a relay round makes them (``by_time``: with the events' partition keys, as this release
    does); the database's seconds per event."""
    also = " AND recorded_at = ANY(r)" if by_time else ""
    body = f"""
    DO $$
    DECLARE s bigint[]; r timestamptz[]; started timestamptz;
    BEGIN
        SELECT array_agg(seq ORDER BY seq), array_agg(DISTINCT recorded_at) INTO s, r
        FROM {table} WHERE published_at IS NULL;
        started := clock_timestamp();
        FOR i IN 0..(cardinality(s) - 1) / {batch} LOOP
            UPDATE {table} SET published_at = clock_timestamp()
            WHERE seq = ANY(s[i * {batch} + 1:(i + 1) * {batch}]){also};
        END LOOP;
        PERFORM set_config('bench.seconds',
            (extract(epoch FROM clock_timestamp() - started) / cardinality(s))::text, true);
    END $$;
    """
    with engine.begin() as connection:
        connection.execute(text(body))
        seconds = connection.execute(text("SELECT current_setting('bench.seconds')")).scalar_one()
    return float(str(seconds))


def _partitioned_bytes(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits"
            " WHERE inhparent = 'worker_call_events'::regclass")).scalar_one())  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--no-write", action="store_true", help="Do not update results.json.")
    parser.add_argument("--fill-only", action="store_true",
                        help="Fill the database and keep it for a later run.")  # fmt: skip
    arguments = parser.parse_args()
    rows = run(arguments.rows, arguments.statements, keep=arguments.fill_only)
    print_table(rows)
    if not arguments.no_write:
        write_results(rows)


if __name__ == "__main__":
    main()
