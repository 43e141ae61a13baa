"""Server fixtures shared by the integration and e2e suites.

The database comes from ``CALLS_WORKER_TEST_DATABASE_URL`` when set; otherwise the suite
starts an embedded PostgreSQL of its own. A server that is configured but unreachable
skips its tests on a laptop and fails them when ``CI`` is set, so CI cannot go green by
testing nothing.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, text

from calls_worker.adapters.db.engine import build_engine, sqlalchemy_url
from calls_worker.adapters.db.migrate import upgrade
from calls_worker.adapters.embedded import start_postgres
from tests.db_world import Db
from tests.reliability import Reliability

IN_CI = bool(os.environ.get("CI"))

WORKER_TABLES = (
    "call_attempts",
    "calls",
    "pledge_cases",
    "persons",
    "organizations",
    "worker_processed_commands_a",  # the two tables behind the view of outcomes (0008)
    "worker_processed_commands_b",
    "worker_results",
    "worker_rejected_commands",
    "worker_sweep_runs",
    "worker_due_calls",
    "worker_call_events",
)

# The outcome records' first turn, as migration 0008 leaves it.
RESET_ROTATION = (
    "UPDATE worker_processed_rotation"
    " SET current_table = 'a', current_since = now(), previous_since = NULL"
)


def unreachable(what: str) -> None:
    """Fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} (CI is set, so this fails instead of skipping)")
    pytest.skip(what)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster", action="store_true",
        help="run the tests of tests/cluster (a RabbitMQ cluster, a PostgreSQL failover);"
        " ./dev test leaves them out, ./dev test-cluster runs them",
    )  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for suite in ("integration", "e2e", "cluster"):
            if f"{os.sep}{suite}{os.sep}" in str(item.path):
                item.add_marker(getattr(pytest.mark, suite))
    if not config.getoption("--cluster"):
        left_out = [item for item in items if item.get_closest_marker("cluster")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if not item.get_closest_marker("cluster")]


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL (of its maintenance database)."""
    configured = os.environ.get("CALLS_WORKER_TEST_DATABASE_URL")
    if configured:
        engine = build_engine(configured, pool_size=1)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as error:  # any failure to connect means the same here
            unreachable(f"PostgreSQL at CALLS_WORKER_TEST_DATABASE_URL is unreachable: {error}")
        finally:
            engine.dispose()
        yield configured
        return
    server = start_postgres(tmp_path_factory.mktemp("pg") / "data", delete=True)
    try:
        yield server.url
    finally:
        server.stop()


def create_database(server_url: str, name: str) -> str:
    """Create an empty database on the server; its URL."""
    admin = build_engine(server_url, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sqlalchemy_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    admin = build_engine(server_url, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def empty_database_url(postgres_server_url: str) -> Iterator[str]:
    """A brand-new empty database, dropped afterwards."""
    name = f"calls_worker_empty_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_server_url, name)
    try:
        yield url
    finally:
        drop_database(postgres_server_url, name)


@contextmanager
def migrated_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new database migrated to head, dropped on exit; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name)
    engine = build_engine(url, pool_size=1)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        drop_database(server_url, name)


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A database of this test session, migrated to head; dropped at the end."""
    with migrated_database(postgres_server_url, "calls_worker_test") as url:
        yield url


@pytest.fixture(scope="module")
def lone_database_url(postgres_server_url: str) -> Iterator[str]:
    """A migrated database of this module alone: no worker of the session works on it (a
    worker's relay would publish the call events a test means to see unpublished)."""
    with migrated_database(postgres_server_url, "calls_worker_lone") as url:
        yield url


@contextmanager
def emptied_after(database_url: str) -> Iterator[Engine]:
    """An engine on a migrated database; every table is emptied on exit."""
    engine = build_engine(database_url, pool_size=10)
    try:
        yield engine
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(WORKER_TABLES)} CASCADE"))
            connection.execute(text(RESET_ROTATION))
        engine.dispose()


@pytest.fixture
def lone_db(lone_database_url: str) -> Iterator[Db]:
    """``db`` on the module's own database (emptied after the test)."""
    with emptied_after(lone_database_url) as engine:
        yield Db(engine)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on the migrated test database; every table is emptied after the test."""
    with emptied_after(database_url) as engine:
        yield engine


@pytest.fixture
def db(engine: Engine) -> Db:
    """Seed and inspect the test database (emptied after the test)."""
    return Db(engine)


_RELIABILITY = Reliability()


@pytest.fixture(scope="session")
def reliability() -> Reliability:
    """Where the single-scenario fault tests record what they injected and counted."""
    return _RELIABILITY


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test of a scenario (marked ``scenario(NAME)``) shows in the table, whether it
    failed before or after it counted."""
    report = yield
    marker = item.get_closest_marker("scenario")
    if marker is not None and report.failed and report.when in ("setup", "call"):
        _RELIABILITY.fail(marker.args[0])
    return report


def whole_suite(config: pytest.Config) -> bool:
    """Whether the session runs every test (no paths, keywords, markers or last-failed)."""
    option = config.option
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS
            and not option.keyword and not option.markexpr and not option.deselect
            and not getattr(option, "lf", False))  # fmt: skip


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run of the whole suite fails when a scenario of the table went unrecorded (a test
    that stopped counting, or was left out)."""
    if whole_suite(session.config) and exitstatus == 0 and not _RELIABILITY.complete():
        print(f"\nthe scenarios {_RELIABILITY.missing()} were not recorded by any test",
              file=sys.stderr)  # fmt: skip
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What the single-scenario fault tests counted (docs/reliability.md is the soak's)."""
    if _RELIABILITY.records:
        terminalreporter.write_line(_RELIABILITY.markdown())
    if whole_suite(terminalreporter.config) and not _RELIABILITY.complete():
        terminalreporter.write_line(
            f"Scenarios no test recorded: {', '.join(_RELIABILITY.missing())}")
