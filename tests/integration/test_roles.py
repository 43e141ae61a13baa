"""The worker runs as a least-privilege role (deploy/sql), migrations as another."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.events import (
    backlog,
    prune_published,
    relay_batch,
    set_events_retention,
    tail,
)
from calls_worker.adapters.db.journal import (
    operational_figures,
    reconcile_due_calls,
    record_rejected,
    rotate_processed,
    set_processed_retention,
)
from calls_worker.adapters.db.migrate import grant_to, upgrade
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import parse_command
from calls_worker.service.apply import handle
from calls_worker.service.sweep import expire_exhausted_calls
from tests.db_world import ISSUED, Db

SQL = Path(__file__).resolve().parents[2] / "deploy" / "sql"


def as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


@pytest.fixture
def roles(empty_database_url: str) -> Iterator[tuple[str, str]]:
    """Migrator and app roles made from deploy/sql, with names of this test's own."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "calls_worker_migrator": f"cw_migrator_{suffix}",
        "calls_worker_app": f"cw_app_{suffix}",
    }

    def script(name: str) -> str:
        sql = (SQL / name).read_text()
        for role, unique in names.items():
            sql = sql.replace(role, unique)
        return sql

    admin = build_engine(empty_database_url, pool_size=1)
    with admin.begin() as connection:
        connection.exec_driver_sql(script("roles.sql"))
    migrator = build_engine(
        as_role(empty_database_url, names["calls_worker_migrator"]), pool_size=1
    )
    upgrade(migrator)
    grant_to(migrator, names["calls_worker_app"])
    migrator.dispose()
    try:
        yield as_role(empty_database_url, names["calls_worker_app"]), empty_database_url
    finally:
        with admin.begin() as connection:
            for role in names.values():
                connection.execute(text(f'DROP OWNED BY "{role}"'))
        admin.dispose()
        # the database goes with empty_database_url; roles are cluster-wide: drop them
        drop = build_engine(make_url(empty_database_url).set(database="postgres")
                            .render_as_string(hide_password=False), pool_size=1)  # fmt: skip
        with drop.begin() as connection:
            for role in names.values():
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        drop.dispose()


def test_the_worker_does_everything_as_the_app_role(roles: tuple[str, str]) -> None:
    app_url, admin_url = roles
    admin = build_engine(admin_url, pool_size=2)
    seed = Db(admin)  # the API's data, written by another role
    organization = seed.organization(2)
    person = seed.person(organization)
    app = build_engine(app_url, pool_size=2)
    try:

        def send(kind: str, payload: dict[str, str]) -> dict[str, object]:
            command = parse_command(kind, {"issuedAt": ISSUED, **payload})  # type: ignore[arg-type]
            return handle(str(uuid.uuid4()), command, SqlUnitOfWork(app))

        created = send("create", {"personUuid": str(person), "organizationUuid": str(organization)})
        call = created["call"]["uuid"]  # type: ignore[index]
        for _ in range(2):
            attempt = {"callUuid": call, "userUuid": str(person), "attemptedAt": ISSUED}
            assert send("add_attempt", attempt)["ok"] is True
        seed.plain_attempt(uuid.UUID(call))  # the API's own insert keeps working too
        assert operational_figures(app).exhausted == 1
        result = expire_exhausted_calls(lambda: SqlUnitOfWork(app), datetime.now(UTC), 10)
        assert result.expired == 1
        # Its call events: written, then published (marked), tailed and pruned, all as the app.
        assert backlog(app).unpublished == 4  # created, two attempts added, expired
        assert relay_batch(app, 10, lambda events: None) == 4
        assert [kept.event["kind"] for kept in tail(app)][-1] == "call.expired"
        set_events_retention(admin, timedelta(0))  # as the owner sets it
        pruned = prune_published(app)  # dropped whole, once their hour is over: none yet
        assert (pruned.dropped, pruned.deleted, pruned.busy) == (0, 0, 0)
        record_rejected(app, task_name="calls.create", command_id=None, raw_body="{}",
                        reason="test")  # fmt: skip
        set_processed_retention(admin, timedelta(0))  # as the owner sets it
        assert rotate_processed(app).swapped  # its 3 outcomes are previous now
        assert app_sees(app, "SELECT count(*) FROM worker_processed_commands") == 3
        for forbidden in (
            "DELETE FROM worker_processed_commands",
            "DELETE FROM worker_processed_commands_a",
            "TRUNCATE worker_processed_commands_b",
            "INSERT INTO worker_processed_commands_b (command_id, kind, outcome)"
            " VALUES ('around', 'create', '{}')",
            "UPDATE worker_processed_rotation SET current_table = 'a'",
            "UPDATE worker_processed_rotation SET keep = interval '0'",
            "UPDATE worker_call_events_retention SET keep = interval '0'",
            "DROP TABLE worker_call_events_default",
        ):
            refused = (ProgrammingError, OperationalError)  # no privilege; a view of a union
            denied = r"permission denied|cannot delete|must be owner"
            with pytest.raises(refused, match=denied), app.begin() as c:
                c.execute(text(forbidden))
        assert reconcile_due_calls(app) == (0, 0)
        with pytest.raises(ProgrammingError, match="permission denied"), app.begin() as c:
            c.execute(text("CREATE TABLE not_allowed (id int)"))
        with pytest.raises(ProgrammingError, match="permission denied"), app.begin() as c:
            c.execute(text("TRUNCATE calls"))
    finally:
        app.dispose()
        admin.dispose()


def test_the_app_role_cannot_make_the_worker_forget_an_outcome_early(
    roles: tuple[str, str],
) -> None:
    """As the worker's role: whatever retention it passes, however often it rotates, the
    outcomes recorded seconds before stay (0011); the owner's retention decides."""
    app_url, admin_url = roles
    admin = build_engine(admin_url, pool_size=1)
    seed = Db(admin)
    organization = seed.organization(2)
    person = seed.person(organization)
    app = build_engine(app_url, pool_size=1)
    try:
        command = parse_command("create", {"issuedAt": ISSUED, "personUuid": str(person),
                                           "organizationUuid": str(organization)})  # fmt: skip
        assert handle("just-now", command, SqlUnitOfWork(app))["ok"] is True
        for _ in range(4):
            with app.begin() as connection:  # the previous release's call, with its own keep
                connection.execute(text("SELECT calls_worker_rotate_processed_commands('0')"))
            rotate_processed(app)
        assert app_sees(app, "SELECT count(*) FROM worker_processed_commands"
                             " WHERE command_id = 'just-now'") == 1  # fmt: skip
        assert app_sees(app, "SELECT keep FROM worker_processed_rotation") == timedelta(hours=72)
        again = handle("just-now", command, SqlUnitOfWork(app))  # a redelivery
        assert app_sees(app, "SELECT count(*) FROM calls") == 1, again
    finally:
        app.dispose()
        admin.dispose()


def app_sees(engine: Engine, sql: str) -> object:
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar()


# A temporary "calls" that shadows the real one for a trigger that does not name pg_temp
# last; its own trigger runs whatever it is given, as whoever is updating the table.
SHADOW = """
CREATE TEMP TABLE calls (uuid uuid, attempt_count integer);
INSERT INTO pg_temp.calls VALUES ('{call}', 0);
CREATE FUNCTION pg_temp.seize() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE public.worker_processed_commands_a;
    RETURN NULL;
END $$;
CREATE TRIGGER seize AFTER UPDATE ON pg_temp.calls
    FOR EACH ROW EXECUTE FUNCTION pg_temp.seize();
"""


@pytest.mark.parametrize("attacker", ["worker", "api"])
def test_a_temporary_table_cannot_hijack_the_triggers(
    roles: tuple[str, str], attacker: str
) -> None:
    """A role that may insert attempts (the worker's, or an API-like role with only its
    DML grants), and may create temporary tables, shadows ``calls`` with its own: the
    counting trigger must still update the real table, never run the role's code as the
    schema's owner."""
    app_url, admin_url = roles
    admin = build_engine(admin_url, pool_size=1)
    seed = Db(admin)
    organization = seed.organization(5)
    call = seed.call(seed.person(organization), organization)
    seed.sql("INSERT INTO worker_processed_commands (command_id, kind, outcome)"
             " VALUES ('kept', 'create', '{}')")  # fmt: skip
    role = str(make_url(app_url).username)
    if attacker == "api":
        role = f"cw_api_{uuid.uuid4().hex[:8]}"
        seed.sql(f'CREATE ROLE "{role}" LOGIN')
        seed.sql(f'GRANT USAGE ON SCHEMA public TO "{role}";'
                 f'GRANT SELECT, INSERT, UPDATE ON calls, call_attempts TO "{role}"')  # fmt: skip
    database = make_url(admin_url).database
    # As the API's database may allow it (deploy/sql revokes it from PUBLIC).
    seed.sql(f'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}"')
    attack = build_engine(as_role(admin_url, role), pool_size=1)
    try:
        with attack.begin() as connection:
            connection.exec_driver_sql(SHADOW.format(call=call))
            connection.execute(
                text("INSERT INTO public.call_attempts (call_uuid, user_uuid, attempted_at)"
                     " VALUES (:c, :u, now())"), {"c": call, "u": uuid.uuid4()})  # fmt: skip
        assert seed.row(call)["attempt_count"] == 1
        kept = seed.sql("SELECT count(*) FROM worker_processed_commands").scalar()
        assert kept == 1
    finally:
        attack.dispose()
        if attacker == "api":
            seed.sql(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')
        admin.dispose()


def test_the_roles_script_takes_temporary_tables_from_public(roles: tuple[str, str]) -> None:
    app_url, _ = roles
    app = build_engine(app_url, pool_size=1)
    try:
        with pytest.raises(ProgrammingError, match="permission denied"), app.begin() as c:
            c.execute(text("CREATE TEMP TABLE calls (uuid uuid)"))
    finally:
        app.dispose()
