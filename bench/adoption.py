"""`migrate` adopting the API's tables while the API writes: how long it takes, and what the
API's writes feel of it.

An API-shaped database (tests/integration/test_adoption.py's schema) is filled with
``--calls`` calls (one person each, 1,000 organizations, ≈ 2.5 attempts a call). An
API-like writer (one connection, each transaction inserting a call and an attempt on an
existing call) runs for ``--before`` seconds alone, then on through `calls-worker migrate`
(a process of its own, as operators run it), then ``--after`` seconds more. Reported: the
migration's time; the writer's longest transaction while it ran (goal ≤ 200 ms: no lock
of the migration's holds the API up for longer); its throughput during the migration
beside its throughput before it.

    python -m bench.adoption --calls 1000000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import Engine, text

from bench.common import Row, print_table, write_results
from bench.fixtures import empty_database
from calls_worker.adapters.db.engine import build_engine
from tests.integration.test_adoption import API_SCHEMA

FILL = """
INSERT INTO organizations (name, max_call_attempts)
SELECT 'org ' || n, CASE WHEN mod(n, 10) = 0 THEN NULL ELSE 3 + mod(n, 4) END
FROM generate_series(1, 1000) n;
CREATE TEMP TABLE numbered_organizations AS
SELECT row_number() OVER (ORDER BY uuid) AS i, uuid FROM organizations;
INSERT INTO persons (owning_organization_uuid)
SELECT o.uuid FROM generate_series(1, :calls) n
JOIN numbered_organizations o ON o.i = 1 + mod(n, 1000);
INSERT INTO calls (status, person_uuid, organization_uuid, external_metadata)
SELECT CASE WHEN mod(n, 10) < 7 THEN 'requested' WHEN mod(n, 10) < 9 THEN 'completed'
            ELSE 'cancelled' END,
       p.uuid, p.owning_organization_uuid,
       CASE WHEN mod(n, 20) = 0 THEN '{"crm": true}'::jsonb END
FROM (SELECT row_number() OVER () AS n, uuid, owning_organization_uuid FROM persons) p;
INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)
SELECT c.uuid, gen_random_uuid(), now()
FROM calls c, generate_series(1, 5) k
WHERE k <= mod(abs(hashtext(c.uuid::text)), 6);
ANALYZE;
"""


@dataclass
class Writer:
    """The API-like writer: each transaction's start and duration."""

    engine: Engine
    stop: threading.Event = field(default_factory=threading.Event)
    samples: list[tuple[float, float]] = field(default_factory=list)

    def run(self) -> None:
        with self.engine.connect() as connection:
            people = list(connection.execute(text("SELECT uuid FROM persons LIMIT 1000")).scalars())
            calls = list(connection.execute(text("SELECT uuid FROM calls LIMIT 1000")).scalars())
        n = 0
        while not self.stop.is_set():
            n += 1
            started = time.monotonic()
            with self.engine.begin() as connection:
                connection.execute(
                    text("INSERT INTO calls (person_uuid, organization_uuid) SELECT uuid,"
                         " owning_organization_uuid FROM persons WHERE uuid = :p"),
                    {"p": people[n % len(people)]},
                )  # fmt: skip
                connection.execute(
                    text("INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
                         " VALUES (:c, gen_random_uuid(), now())"),
                    {"c": calls[(n * 7) % len(calls)]},
                )  # fmt: skip
            self.samples.append((started, time.monotonic() - started))

    def between(self, start: float, end: float) -> list[float]:
        return [d for s, d in self.samples if start <= s < end]


def adopt_while_writing(
    engine: Engine, url: str, args: argparse.Namespace
) -> tuple[Writer, float, float]:
    """Fill the database, start the writer, run migrate beside it; the writer and when
    migrate started and ended."""
    started = time.monotonic()
    with engine.begin() as connection:
        connection.exec_driver_sql(API_SCHEMA)
        for statement in FILL.split(";"):
            if statement.strip():
                connection.execute(text(statement), {"calls": args.calls})
    print(f"filled {args.calls:,} calls in {time.monotonic() - started:.0f} s", flush=True)

    writer = Writer(engine)
    thread = threading.Thread(target=writer.run)
    thread.start()
    time.sleep(args.before)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    migrate_started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "calls_worker", "migrate", "--batch-size",
         str(args.batch_size)],
        env={**env, "CALLS_WORKER_DATABASE_URL": url}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    migrate_ended = time.monotonic()
    time.sleep(args.after)
    writer.stop.set()
    thread.join()
    if done.returncode != 0:
        raise SystemExit(f"migrate failed:\n{done.stdout}\n{done.stderr}")
    with engine.connect() as connection:
        wrong = connection.execute(
            text("SELECT count(*) FROM calls c WHERE c.attempt_count <>"
                 " (SELECT count(*) FROM call_attempts a WHERE a.call_uuid = c.uuid)")
        ).scalar()  # fmt: skip
    if wrong:
        raise SystemExit(f"{wrong} calls counted wrong")
    return writer, migrate_started, migrate_ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--before", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="Do not update results.json.")
    args = parser.parse_args()

    name = f"calls_worker_bench_adoption_{uuid.uuid4().hex[:8]}"
    with empty_database(name) as url:
        engine = build_engine(url, pool_size=2)
        try:
            writer, migrate_started, migrate_ended = adopt_while_writing(engine, url, args)
        finally:
            engine.dispose()

    first = writer.samples[0][0]
    first = writer.samples[0][0]
    before = writer.between(first, migrate_started)
    during = writer.between(migrate_started, migrate_ended)
    before_rate = len(before) / (migrate_started - first)
    during_rate = len(during) / (migrate_ended - migrate_started)
    seconds = migrate_ended - migrate_started
    longest = max(during) * 1000
    size = f"{args.calls:,} calls"
    rows = [
        Row("adoption", f"migrate adopting {size}", seconds, "s",
            "", None, "", True, {"batch_size": args.batch_size}),
        Row("adoption", f"API writer's longest transaction, {size}", longest, "ms",
            "longest before it", max(before) * 1000, "≤ 200 ms", longest <= 200),
        Row("adoption", f"API writer's transactions/s, {size}", during_rate, "/s",
            "before it", before_rate, "", True),
    ]  # fmt: skip
    print_table(rows)
    if not args.no_write:
        write_results(rows)


if __name__ == "__main__":
    main()
