"""Listing calls: a page of 25 at any depth, beside OFFSET paging on the same data.

On the generated data set (``--calls``, 5,000,000 for the goal), one organization is made
large: 20,000 calls performed by others for persons it owns (reached through the person),
20,000 calls it performs for persons of others (reached as performer), and one of its
persons with 10,100 calls. For three listings — a service account of that organization
(its reach: performer OR owner, the expensive case), filtered by that organization as
performer, filtered by that person — it measures the database time of the first page and
of the page 10,000 calls deep, by cursor (the worker's statement, listing.page_statement)
and by OFFSET on the same order; and, for the service account, the first page of the
plain "performer = X OR the person's owner = X" query that ``worker_call_reach`` replaces.
Database time is ``EXPLAIN (ANALYZE, TIMING OFF)``'s execution time, the median of 15 runs
after 3 to warm up. Goal: ≤ 5 ms for every page by cursor.

It also measures what the reach record costs the API: inserting a call (one statement a
transaction, as the API would) with the reach triggers, beside with them disabled.

    python -m bench.listing --calls 5000000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import Connection, Engine, text

from bench.common import Row, copy_of, print_table, server_url, template, write_results
from calls_worker.adapters.db.listing import page_parameters, page_statement
from calls_worker.domain.commands import ListCalls, parse_list_calls
from calls_worker.domain.paging import Position

GOAL_MS = 5.0
PAGE = 25
DEEP = 10_000

SCENE = """
INSERT INTO organizations (uuid, name, max_call_attempts) VALUES (:big, 'big', 3);
CREATE TEMP TABLE others AS SELECT uuid FROM organizations WHERE uuid <> :big;
CREATE TEMP TABLE owned AS SELECT gen_random_uuid() AS uuid, n FROM generate_series(1, 20000) n;
INSERT INTO persons (uuid, owning_organization_uuid) SELECT uuid, :big FROM owned;
INSERT INTO persons (uuid, owning_organization_uuid) VALUES (:person, :big);
CREATE TEMP TABLE foreign_people AS
SELECT gen_random_uuid() AS uuid, n, (SELECT uuid FROM others ORDER BY uuid
    OFFSET n % 999 LIMIT 1) AS owner FROM generate_series(1, 20000) n;
INSERT INTO persons (uuid, owning_organization_uuid) SELECT uuid, owner FROM foreign_people;
INSERT INTO calls (uuid, status, type, person_uuid, organization_uuid, created_at, updated_at)
SELECT gen_random_uuid(), 'requested', 'verification', o.uuid, f.owner,
       now() - interval '1 day' - random() * interval '59 days', now()
FROM owned o JOIN foreign_people f USING (n);
INSERT INTO calls (uuid, status, type, person_uuid, organization_uuid, created_at, updated_at)
SELECT gen_random_uuid(), 'requested', 'happy_call', f.uuid, :big,
       now() - interval '1 day' - random() * interval '59 days', now()
FROM foreign_people f;
INSERT INTO calls (uuid, status, type, person_uuid, organization_uuid, created_at, updated_at)
SELECT gen_random_uuid(), 'requested', 'winback', :person, :big,
       now() - interval '1 day' - random() * interval '59 days', now()
FROM generate_series(1, 10100)
"""

NAIVE_REACH = (
    "SELECT c.uuid FROM calls c JOIN persons p ON p.uuid = c.person_uuid"
    " WHERE c.organization_uuid = :reach OR p.owning_organization_uuid = :reach"
    " ORDER BY c.created_at DESC, c.uuid DESC LIMIT :limit"
)


def database_ms(connection: Connection, sql: str, params: dict[str, Any], runs: int = 15) -> float:
    """The median execution time of ``sql`` in milliseconds, after 3 warm-up runs."""
    explain = text(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}")
    times = []
    for n in range(runs + 3):
        plan = connection.execute(explain, params).scalar_one()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        if n >= 3:
            times.append(float(plan[0]["Execution Time"]))
    return statistics.median(times)


def deep_position(connection: Connection, sql: str, params: dict[str, Any]) -> Position:
    """Where the page ending 10,000 calls deep ends (what its cursor would name)."""
    row = connection.execute(
        text(f"SELECT created_at, uuid FROM ({sql}) AS page OFFSET :offset LIMIT 1"),
        {**params, "limit": DEEP, "offset": DEEP - 1},
    ).one()
    return Position(row.created_at, row.uuid)


def pages(connection: Connection, name: str, query: ListCalls, reach: UUID | None) -> list[Row]:
    rows = []
    first_sql = page_statement(query, reach, None)
    first = page_parameters(query, reach, None, PAGE + 1)
    for depth in (0, DEEP):
        if depth == 0:
            sql, params = first_sql, first
        else:
            after = deep_position(connection, first_sql, first)
            sql, params = page_statement(query, reach, after), page_parameters(
                query, reach, after, PAGE + 1
            )
        keyset = database_ms(connection, sql, params)
        offset = database_ms(connection, f"{first_sql} OFFSET {depth}", first)
        where = "first page" if depth == 0 else f"{DEEP:,} deep"
        rows.append(Row("listing", f"{name}, {where}", keyset, "ms", "OFFSET, same order",
                        offset, f"≤ {GOAL_MS:g} ms", keyset <= GOAL_MS))  # fmt: skip
    return rows


def versus_no_reach_record(connection: Connection, name: str, organization: UUID) -> list[Row]:
    """A service account's first page through the reach record, beside the plain query."""
    query = parse_list_calls({"serviceAccountUuid": str(uuid4())})
    sql = page_statement(query, organization, None)
    keyset = database_ms(connection, sql, page_parameters(query, organization, None, PAGE + 1))
    naive = database_ms(connection, NAIVE_REACH, {"reach": organization, "limit": PAGE + 1})
    reached = connection.execute(
        text("SELECT count(*) FROM worker_call_reach WHERE organization_uuid = :o"),
        {"o": organization},
    ).scalar_one()
    return [Row("listing", f"reach of {name}, first page", keyset, "ms",
                "performer OR owner, no reach record", naive, f"≤ {GOAL_MS:g} ms",
                keyset <= GOAL_MS, {"reached": reached})]  # fmt: skip


def insert_cost(engine: Engine, person: UUID, organization: UUID, count: int) -> Row:
    """Inserting a call, each its own transaction: with the reach triggers, and without."""

    def timed(enabled: bool) -> float:
        with engine.connect() as connection:
            verb = "ENABLE" if enabled else "DISABLE"
            for trigger in ("calls_reach",):
                connection.execute(text(f"ALTER TABLE calls {verb} TRIGGER {trigger}"))
            connection.commit()
            insert = text(
                "INSERT INTO calls (uuid, status, type, person_uuid, organization_uuid,"
                " created_at, updated_at) VALUES (:u, 'completed', 'verification', :p, :o,"
                " now(), now())"
            )
            started = time.perf_counter()
            for _ in range(count):
                connection.execute(insert, {"u": uuid4(), "p": person, "o": organization})
                connection.commit()
            return (time.perf_counter() - started) / count * 1000

    rounds = [(timed(True), timed(False)) for _ in range(3)]
    with_triggers = statistics.median(r[0] for r in rounds)
    without = statistics.median(r[1] for r in rounds)
    return Row("listing", "insert a call (API), reach triggers on", with_triggers, "ms",
               "reach triggers off", without, "report", True)  # fmt: skip


def run(calls: int, inserts: int) -> list[Row]:
    server = server_url()
    data = template(server, calls)
    big, person = uuid4(), uuid4()
    with copy_of(server, data) as engine:
        started = time.perf_counter()
        with engine.begin() as connection:
            for statement in SCENE.split(";\n"):
                connection.execute(text(statement), {"big": big, "person": person})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
        print(f"  the large organization's calls: {time.perf_counter() - started:.1f}s",
              flush=True)  # fmt: skip
        rows = []
        with engine.connect() as connection:
            account = parse_list_calls({"serviceAccountUuid": str(uuid4())})
            rows += pages(connection, "service account's reach", account, big)
            rows += versus_no_reach_record(connection, "the large organization", big)
            ordinary = connection.execute(
                text("SELECT uuid FROM organizations WHERE uuid <> :big ORDER BY uuid LIMIT 1"),
                {"big": big},
            ).scalar_one()
            rows += versus_no_reach_record(connection, "an ordinary organization", ordinary)
            rows += pages(connection, "by performing organization",
                          parse_list_calls({"organizationUuid": str(big)}), None)  # fmt: skip
            rows += pages(connection, "by person",
                          parse_list_calls({"personUuid": str(person)}), None)  # fmt: skip
        rows.append(insert_cost(engine, person, big, inserts))
    for row in rows:
        row.details["calls"] = calls + 50_100  # with the large organization's

    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5_000_000)
    parser.add_argument("--inserts", type=int, default=2_000)
    arguments = parser.parse_args()
    rows = run(arguments.calls, arguments.inserts)
    print_table(rows)
    write_results(rows)


if __name__ == "__main__":
    main()
