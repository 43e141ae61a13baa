"""Schema upgrades with alembic, safe to run twice and from two processes at once."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from calls_worker.adapters.db.adoption import DEFAULT_BATCH_SIZE
from calls_worker.adapters.db.contract import mismatches, present_tables

logger = logging.getLogger("calls_worker")

# The Calls API shares this database and may use alembic itself: keep our own version table.
VERSION_TABLE = "calls_worker_alembic_version"
# Any constant will do; two migrating processes take turns on it.
MIGRATION_LOCK = 7_304_118_001


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return config


# DDL on the API's tables waits this long for its lock, then gives up (and is tried again)
# rather than queueing the API's writes behind it.
LOCK_TIMEOUT = "3s"
LOCK_TRIES = 20


class ContractBroken(Exception):
    """The API's tables are there but break the worker's contract; nothing was changed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "the Calls tables in this database do not meet what the worker needs"
            " (nothing was changed):\n" + "\n".join(f"  - {p}" for p in problems)
        )
        self.problems = problems


@dataclass(frozen=True)
class Plan:
    """What ``upgrade`` would do to a database: ``create`` the Calls tables and the worker's
    objects, ``adopt`` the API's tables, ``upgrade`` the worker's objects from ``revision``,
    nothing (``current``), or ``refuse`` (``problems`` says why)."""

    action: Literal["create", "adopt", "upgrade", "current", "refuse"]
    revision: str | None
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        head = head_revision()
        return {
            "create": f"create the Calls tables and the worker's objects (revision {head})",
            "adopt": "adopt the API's Calls tables: add attempt_count and completed_by,"
            " the triggers, the worker's indexes and tables, and backfill both, online"
            f" (revision {head})",
            "upgrade": f"upgrade the worker's objects from revision {self.revision} to {head}",
            "current": f"do nothing: the schema is at revision {head} already",
            "refuse": "refuse: the Calls tables do not meet what the worker needs:\n"
            + "\n".join(f"  - {p}" for p in self.problems),
        }[self.action]


def plan(engine: Engine) -> Plan:
    """What ``upgrade`` would do here; reads the catalog only."""
    revision = current_revision(engine)
    if revision is not None:
        return Plan("current" if revision == head_revision() else "upgrade", revision)
    with engine.connect() as connection:
        if not present_tables(connection):
            return Plan("create", None)
        problems = mismatches(connection)
    return Plan("refuse", None, tuple(problems)) if problems else Plan("adopt", None)


def upgrade(
    engine: Engine, revision: str = "head", *, batch_size: int = DEFAULT_BATCH_SIZE
) -> None:
    """Bring the schema to ``revision``; a no-op when it is there already.

    On a database where the API's tables exist and the worker's do not, adopts them
    (adoption.py) once they meet the contract, else raises ContractBroken and changes
    nothing. DDL that cannot have its lock within LOCK_TIMEOUT is tried again.
    """
    for attempt in range(1, LOCK_TRIES + 1):
        try:
            _run(engine, lambda config: _upgrade(engine, config, revision, batch_size))
            return
        except OperationalError as error:
            if not isinstance(error.orig, psycopg.errors.LockNotAvailable) or attempt == LOCK_TRIES:
                raise
            logger.warning("migrate: a lock was not granted in %s; trying again (%d of %d)",
                           LOCK_TIMEOUT, attempt, LOCK_TRIES)  # fmt: skip
            time.sleep(min(attempt, 5))


def _upgrade(engine: Engine, config: Config, revision: str, batch_size: int) -> None:
    the_plan = plan(engine)
    if the_plan.action == "refuse":
        raise ContractBroken(list(the_plan.problems))
    config.attributes["adopting"] = the_plan.action == "adopt"
    config.attributes["batch_size"] = batch_size
    command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to ``revision`` (``base``: nothing of ours left, not even the
    version table; adopted tables are left to the API as they were found)."""
    _run(engine, lambda config: command.downgrade(config, revision))
    if revision == "base":
        with engine.begin() as connection:
            connection.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))


GRANTS = Path(__file__).parent / "grants.sql"
_GRANTEE = "calls_worker_app"
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def grant_to(engine: Engine, role: str) -> None:
    """Grant ``role`` what the worker, beat and Flower need, and nothing more (grants.sql).

    Idempotent; run after every upgrade, as the owner of the worker's objects. Raises
    ValueError for a role name that is not a plain lower-case identifier.
    """
    if not _ROLE_NAME.fullmatch(role):
        raise ValueError(f"not a plain role name: {role!r}")
    with engine.begin() as connection:
        connection.exec_driver_sql(GRANTS.read_text().replace(_GRANTEE, role))


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def schema_behind(engine: Engine) -> str | None:
    """Why this release may not apply commands yet against the database's schema; None
    when it may: the schema is at this release's revision, or at one this release does not
    know, which only a later release's migrate writes (docs/upgrades.md: a later schema
    keeps what an earlier release uses). Raises while the database does not answer."""
    current = current_revision(engine)
    script = ScriptDirectory.from_config(_config())
    head = script.get_current_head()
    if current == head:
        return None
    if current is None:
        return f"the database has no calls-worker schema yet (this release needs {head})"
    known = {revision.revision for revision in script.walk_revisions()}
    if current not in known:
        return None  # a later release's
    return f"the database's schema is at {current}, older than this release's {head}"


def _take_turn(connection: Connection) -> None:
    """Hold the migration lock (for the session), waiting for another migrate to finish.

    Asked again and again, each time in a transaction of its own, rather than waited for in
    one: a waiting transaction would hold a snapshot that an index built CONCURRENTLY by
    the migrate holding the lock must wait for, and the two would deadlock.
    """
    while True:
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK}
        ).scalar()
        connection.commit()
        if taken:
            return
        time.sleep(_TURN_POLL_SECONDS)


_TURN_POLL_SECONDS = 0.2


def _run(engine: Engine, action: Callable[[Config], object]) -> None:
    config = _config()
    with engine.connect() as connection:
        _take_turn(connection)
        connection.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
        connection.commit()
        try:
            config.attributes["connection"] = connection
            action(config)
            connection.commit()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()
