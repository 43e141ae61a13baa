"""Adopting the API's database while the API's own role writes: no write of it is refused.

The API's tables belong to a role of their own, not a superuser (a superuser passes every
privilege check and would hide what these tests are for). The triggers that migrate puts
on those tables call the worker's functions, which write the worker's tables: the API's
role may do that only because the functions run as their owner (SECURITY DEFINER). A
function that ran as its caller for a moment (made, or made again by a resumed adoption's
CREATE OR REPLACE, before it was made SECURITY DEFINER) refused the API's writes then.
"""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import Engine, text

from calls_worker.adapters.db import adoption
from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import (
    MIGRATION_LOCK,
    current_revision,
    head_revision,
    upgrade,
)
from tests.db_world import Db
from tests.integration.test_adoption import (
    api_database,
    exact_counts,
    reach_by_rule,
    reach_by_table,
)
from tests.integration.test_due_calls import due_by_policy, due_by_table
from tests.integration.test_roles import as_role

# How many times a migrate is killed before one is let finish (a documented knob: more
# rounds, more kill points).
KILLS = int(os.environ.get("CALLS_WORKER_TEST_ADOPTION_KILLS", "12"))
WINDOW = 0.8  # seconds: the first kill falls within this of migrate taking its lock

_FUNCTIONS = text(
    "SELECT p.oid::regprocedure::text AS name, p.prosecdef, p.proconfig, p.proacl::text[]"
    " FROM pg_proc p WHERE p.proname LIKE 'calls\\_worker\\_%' ORDER BY 1"
)


def functions(engine: Engine) -> dict[str, tuple[Any, ...]]:
    """Each of the worker's functions: SECURITY DEFINER or not, its settings, its grants."""
    with engine.connect() as connection:
        return {row.name: tuple(row)[1:] for row in connection.execute(_FUNCTIONS)}


@pytest.fixture
def api_owned(empty_database_url: str, postgres_server_url: str) -> Iterator[tuple[Engine, str]]:
    """The API's database, its tables owned by the API's role (LOGIN, no superuser): an
    engine that connects as that role, and the role's name."""
    owner = f"api_owner_{uuid4().hex[:8]}"
    admin = build_engine(empty_database_url, pool_size=1)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE ROLE "{owner}" LOGIN')
        connection.exec_driver_sql(f'GRANT CREATE, USAGE ON SCHEMA public TO "{owner}"')
    api = api_database(as_role(empty_database_url, owner))
    try:
        yield api, owner
    finally:
        api.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP OWNED BY "{owner}" CASCADE')
        admin.dispose()
        server = build_engine(postgres_server_url, pool_size=1)
        with server.begin() as connection:
            connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{owner}"')
        server.dispose()


class ApiWriter(threading.Thread):
    """The API at work, as its own role: calls inserted and deleted, attempts added, people
    moved to another owner, maxima changed, each in a transaction of its own, in a loop.
    Every refused write is kept, with what it was."""

    def __init__(self, url: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.engine = build_engine(url, pool_size=1)
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.written: Counter[str] = Counter()
        self.refused: list[tuple[str, str]] = []
        with self.engine.connect() as connection:
            self.people = list(connection.exec_driver_sql(
                "SELECT uuid FROM persons ORDER BY uuid LIMIT 60").scalars())  # fmt: skip
            self.organizations = list(connection.exec_driver_sql(
                "SELECT uuid FROM organizations WHERE max_call_attempts IS NOT NULL"
                " ORDER BY uuid").scalars())  # fmt: skip
        self.mine: list[UUID] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                write = self.random.choice(
                    (self.insert_call, self.insert_call, self.attempt, self.attempt,
                     self.delete_call, self.move_person, self.change_maximum)
                )  # fmt: skip
                try:
                    with self.engine.begin() as connection:
                        write(connection)
                    self.written[write.__name__] += 1
                except Exception as error:  # a refused write: what the test is about
                    self.refused.append((write.__name__, str(error).splitlines()[0]))
        finally:
            self.engine.dispose()

    def insert_call(self, connection: Any) -> None:
        call = connection.execute(text(
            "INSERT INTO calls (person_uuid, organization_uuid) SELECT uuid,"
            " owning_organization_uuid FROM persons WHERE uuid = :p RETURNING uuid"),
            {"p": self.random.choice(self.people)}).scalar()  # fmt: skip
        self.mine.append(call)

    def attempt(self, connection: Any) -> None:
        connection.execute(text(
            "INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
            " SELECT uuid, gen_random_uuid(), now() FROM calls ORDER BY uuid OFFSET :k LIMIT 1"),
            {"k": self.random.randrange(3000)})  # fmt: skip

    def delete_call(self, connection: Any) -> None:
        if not self.mine:
            return
        call = self.mine.pop(self.random.randrange(len(self.mine)))
        connection.execute(text("DELETE FROM call_attempts WHERE call_uuid = :c"), {"c": call})
        connection.execute(text("DELETE FROM calls WHERE uuid = :c"), {"c": call})

    def move_person(self, connection: Any) -> None:
        connection.execute(
            text("UPDATE persons SET owning_organization_uuid = :o WHERE uuid = :p"),
            {"o": self.random.choice(self.organizations), "p": self.random.choice(self.people)},
        )

    def change_maximum(self, connection: Any) -> None:
        connection.execute(
            text("UPDATE organizations SET max_call_attempts = :m WHERE uuid = :o"),
            {"m": self.random.randint(2, 6), "o": self.random.choice(self.organizations)},
        )


def migrating(engine: Engine, child: subprocess.Popen[bytes]) -> None:
    """Until ``child`` (a migrate) holds the migration lock, or has exited."""
    deadline = time.monotonic() + 60
    while child.poll() is None:
        with engine.connect() as connection:
            if connection.execute(_MIGRATING, {"key": MIGRATION_LOCK}).scalar():
                return
        assert time.monotonic() < deadline, "migrate never took its lock"
        time.sleep(0.01)


_MIGRATING = text(
    "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND ((classid::bigint << 32) | objid::bigint) = :key AND database = ("
    " SELECT oid FROM pg_database WHERE datname = current_database()))"
)


def where_it_stopped(engine: Engine) -> str:
    """The revision a killed migrate reached, and the backfill it was in, if any."""
    with engine.connect() as connection:
        revision = current_revision(engine) or "none"
        if connection.exec_driver_sql("SELECT to_regclass('worker_adoption')").scalar() is None:
            return revision
        steps = connection.exec_driver_sql(
            "SELECT step FROM worker_adoption WHERE finished_at IS NULL AND last_key IS NOT NULL"
        ).scalars()
        return "+".join([revision, *steps])


def test_a_migrate_killed_and_rerun_at_random_points_never_refuses_an_api_write(
    api_owned: tuple[Engine, str], empty_database_url: str
) -> None:
    """From nothing of ours to head: migrate is killed (SIGKILL) at a random moment, KILLS
    times, each rerun resuming the last; then one is let finish. The API's role writes all
    the while. None of its writes is refused, and what the adoption keeps is exact."""
    _, owner = api_owned
    admin = build_engine(empty_database_url, pool_size=1)  # reads what the API's role may not
    seed = int(os.environ.get("CALLS_WORKER_TEST_SEED", random.randrange(2**32)))
    chance = random.Random(seed)
    print(f"seed {seed}")
    writer = ApiWriter(as_role(empty_database_url, owner), seed)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    environment["CALLS_WORKER_DATABASE_URL"] = empty_database_url
    command = [sys.executable, "-m", "calls_worker", "migrate", "--batch-size", "5"]
    stops: list[str] = []
    window = WINDOW
    writer.start()
    try:
        for _ in range(KILLS):
            child = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
            # From the moment it holds the migration lock (its imports done: their time varies
            # with the machine), a whole adoption takes ~3.5 s here. Each rerun does its
            # migration's statements again before it resumes the backfill: on a slower
            # machine, kills within WINDOW can all land before it gets further. A kill that
            # found it where the last did widens the next one's window.
            migrating(admin, child)
            try:
                child.wait(chance.uniform(0.0, window))
                stops.append("finished")
                break
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(30)
            stops.append(where_it_stopped(admin))
            same = len(stops) > 1 and stops[-1] == stops[-2]
            window = min(window * 1.5, 4.0) if same else WINDOW
        finished = subprocess.run(command, env=environment, capture_output=True, text=True,
                                  timeout=240, check=False)  # fmt: skip
        assert finished.returncode == 0, finished.stderr
        time.sleep(0.3)  # and the API goes on writing on the adopted tables
    finally:
        writer.stop.set()
        writer.join(60)
        admin.dispose()
    print("killed at:", stops)
    print("written:", dict(writer.written))
    assert writer.refused == [], (seed, stops, writer.refused[:5])
    killed = [stop for stop in stops if stop != "finished"]
    assert len(killed) >= KILLS // 2, stops  # killed many times,
    assert len(set(killed)) >= 2, stops  # in more than one migration
    assert sum(writer.written.values()) > 50, writer.written
    assert current_revision(admin) == head_revision()
    assert exact_counts(admin) == 0
    assert due_by_table(Db(admin)) == due_by_policy(admin)
    assert reach_by_table(admin) == reach_by_rule(admin)


def rerun_0003(connection: Any) -> None:
    module = importlib.import_module("calls_worker.adapters.db.migrations.versions.0003_due_calls")
    adoption.run_online(connection, module.UPGRADE)


def rerun_0007(connection: Any) -> None:
    module = importlib.import_module(
        "calls_worker.adapters.db.migrations.versions.0007_service_accounts"
    )
    adoption.run_functions(connection, module.FUNCTIONS)
    adoption.run_online(connection, module.TRIGGERS)


@pytest.mark.parametrize(("revision", "rerun"), [("0003", rerun_0003), ("0007", rerun_0007)])
def test_a_resumed_adoption_rerunning_a_migrations_functions_keeps_each_whole(
    api_owned: tuple[Engine, str], empty_database_url: str, revision: str, rerun: Any
) -> None:
    """What a migrate resumed after being killed in this revision runs again (its
    functions, then its triggers, through CREATE OR REPLACE) leaves every function as it
    was: SECURITY DEFINER, its search path, its grants. The API's role then still writes."""
    _, owner = api_owned
    migrator = build_engine(empty_database_url, pool_size=1)
    try:
        upgrade(migrator, revision, batch_size=500)
        whole = functions(migrator)
        definers = [name for name, (definer, *_) in whole.items() if definer]
        assert "calls_worker_track_due_call()" in definers
        for name in definers:  # each with the search path no caller can change
            assert "search_path=pg_catalog, public, pg_temp" in whole[name][1], name
        with migrator.connect() as connection:
            rerun(connection.execution_options(isolation_level="AUTOCOMMIT"))
        assert functions(migrator) == whole
    finally:
        migrator.dispose()
    writer = ApiWriter(as_role(empty_database_url, owner), seed=1)
    for write in (writer.insert_call, writer.attempt, writer.move_person, writer.delete_call,
                  writer.change_maximum):  # fmt: skip
        with writer.engine.begin() as connection:
            write(connection)
    writer.engine.dispose()
