"""Adopting the API's tables online: what ``migrate`` adds to them, and the two backfills.

Where the Calls API's tables exist already, full of data and being written to, the
worker adds its own objects without stopping the API's writes for more than a moment:

- DDL on the API's tables (a column with a default, a trigger) takes its lock for a
  moment only, and gives up after ``lock_timeout`` instead of queueing every writer behind
  a long transaction of the API's (``migrate`` then tries again);
- indexes are built ``CONCURRENTLY``;
- ``attempt_count`` and the due-calls record are backfilled in batches of calls, each its
  own short transaction, in key order. A batch first takes its calls' owners' advisory
  locks (shared, in the order writers take them), then locks its calls (so an attempt being
  added to one of them finishes first, and none can start), then counts in a statement of
  its own, which sees every attempt committed: the count is exact, and the counting
  trigger, live before the backfill starts, keeps it so afterwards.

Progress is kept in ``worker_adoption`` (one row a backfill, with the last key done), so a
``migrate`` killed half-way resumes where it stopped. The table also says, for a
downgrade, that the API's tables were adopted and must be left as they were found.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

logger = logging.getLogger("calls_worker")

ADOPTION_TABLE = "worker_adoption"
ATTEMPT_COUNTS = "attempt_count"
DUE_CALLS = "due_calls"
CALL_REACH = "call_reach"
ADOPTED = "adopted"
DEFAULT_BATCH_SIZE = 1000

CREATE_PROGRESS = f"""
CREATE TABLE IF NOT EXISTS {ADOPTION_TABLE} (
    step text PRIMARY KEY,
    last_key uuid NULL,
    finished_at timestamptz NULL
)
"""

_NEXT_BATCH = text(
    "SELECT uuid FROM calls WHERE (CAST(:after AS uuid) IS NULL OR uuid > :after)"
    " ORDER BY uuid LIMIT :size"
)
# The owners of a batch's calls, locked (shared) in the order in which a change of an owner
# or a maximum takes them (exclusively: calls_worker_lock_organizations, migration 0005),
# before the calls themselves: a batch never holds a call while it waits for an owner that a
# writer holds while it waits for that call.
OWNER_LOCK_CLASS = 730_411  # migration 0005's LOCK_CLASS
_LOCK_OWNERS = text(
    f"SELECT count(pg_advisory_xact_lock_shared({OWNER_LOCK_CLASS}, key)) FROM ("
    " SELECT DISTINCT hashtext(p.owning_organization_uuid::text) AS key FROM calls c"
    " JOIN persons p ON p.uuid = c.person_uuid WHERE c.uuid = ANY (CAST(:uuids AS uuid[]))"
    " ORDER BY 1) AS keys"
)
# FOR NO KEY UPDATE, not FOR UPDATE: it stops an attempt being counted (its trigger updates
# the call) but not a writer that only checks a foreign key to the call (KEY SHARE), as a
# change of a person's owner does when it rechecks their calls.
_LOCK_BATCH = text(
    "SELECT uuid FROM calls WHERE uuid = ANY (CAST(:uuids AS uuid[])) ORDER BY uuid"
    " FOR NO KEY UPDATE"
)
_COUNT = text(
    "UPDATE calls c SET attempt_count = n.count"
    " FROM (SELECT u AS uuid,"
    "       (SELECT count(*) FROM call_attempts a WHERE a.call_uuid = u)::integer AS count"
    "       FROM unnest(CAST(:uuids AS uuid[])) AS u) n"
    " WHERE c.uuid = n.uuid AND c.attempt_count <> n.count"
)
_REFRESH_DUE = text(
    "SELECT count(*) FILTER (WHERE calls_worker_refresh_due_call(c.uuid)) FROM calls c"
    " WHERE c.uuid = ANY (CAST(:uuids AS uuid[]))"
    " AND c.status = 'requested' AND c.external_metadata IS NULL"
)
_FILL_REACH = text("SELECT calls_worker_fill_call_reach(CAST(:uuids AS uuid[]))")
_WORK = {ATTEMPT_COUNTS: _COUNT, DUE_CALLS: _REFRESH_DUE, CALL_REACH: _FILL_REACH}
_PROGRESS = text(f"UPDATE {ADOPTION_TABLE} SET last_key = :key WHERE step = :step")
_FINISHED = text(f"UPDATE {ADOPTION_TABLE} SET finished_at = now() WHERE step = :step")


def start(connection: Connection) -> None:
    """Record that the tables are being adopted, and which backfills are owed."""
    connection.exec_driver_sql(CREATE_PROGRESS)
    connection.execute(
        text(f"INSERT INTO {ADOPTION_TABLE} (step) VALUES (:a), (:b), (:c)"
             " ON CONFLICT (step) DO NOTHING"),
        {"a": ADOPTED, "b": ATTEMPT_COUNTS, "c": DUE_CALLS},
    )  # fmt: skip


def owe(connection: Connection, step: str) -> None:
    """Record that the backfill ``step`` is owed (on any database with calls, adopted or not)."""
    connection.exec_driver_sql(CREATE_PROGRESS)
    connection.execute(
        text(f"INSERT INTO {ADOPTION_TABLE} (step) VALUES (:s) ON CONFLICT (step) DO NOTHING"),
        {"s": step},
    )


def adopted(connection: Connection) -> bool:
    """Whether this database's Calls tables were the API's before the worker came."""
    exists = connection.execute(text("SELECT to_regclass(:t)"), {"t": ADOPTION_TABLE}).scalar()
    if exists is None:
        return False
    return bool(
        connection.execute(
            text(f"SELECT EXISTS (SELECT FROM {ADOPTION_TABLE} WHERE step = :s)"), {"s": ADOPTED}
        ).scalar()
    )


def _pending(connection: Connection, step: str) -> tuple[bool, UUID | None]:
    """Whether ``step`` is owed, and the last key it did."""
    if connection.execute(text("SELECT to_regclass(:t)"), {"t": ADOPTION_TABLE}).scalar() is None:
        return False, None
    row = connection.execute(
        text(f"SELECT last_key, finished_at FROM {ADOPTION_TABLE} WHERE step = :s"), {"s": step}
    ).one_or_none()
    if row is None or row.finished_at is not None:
        return False, None
    return True, row.last_key


def repeatable(sql: str) -> str:
    """The same statements, safe to run a second time (a resumed adoption does)."""
    for plain, again in (
        ("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
        ("CREATE TRIGGER", "CREATE OR REPLACE TRIGGER"),
        ("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"),
        ("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"),
    ):
        sql = re.sub(rf"{plain}(?! IF NOT EXISTS)", again, sql)
    return sql


def statements(sql: str) -> list[str]:
    """``sql`` cut into its statements: its comment lines dropped, then cut at each ``;``
    outside a $$-quoted body."""
    text_only = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    found: list[str] = []
    current: list[str] = []
    quoted = False
    for part in re.split(r"(\$\$|;)", text_only):
        if part == "$$":
            quoted = not quoted
        if part == ";" and not quoted:
            found.append("".join(current).strip())
            current = []
            continue
        current.append(part)
    found.append("".join(current).strip())
    return [statement for statement in found if statement]


def run_online(connection: Connection, sql: str) -> None:
    """Each statement of ``sql`` in a transaction of its own, on a connection in autocommit
    mode: a DDL statement then holds its table's lock only while it runs, never while it
    waits for another table's, which is how it would deadlock with a writer of the API that
    takes the two tables in the other order."""
    for statement in statements(repeatable(sql)):
        connection.exec_driver_sql(statement)


def run_functions(connection: Connection, sql: str) -> None:
    """The statements of ``sql`` (functions and their grants, nothing that locks a table of
    the API's) in one transaction, on a connection in autocommit mode.

    A function a trigger calls must be whole whenever a trigger can call it: SECURITY
    DEFINER and its search path said in the statement that creates it (CREATE OR REPLACE,
    which a resumed adoption runs, resets whatever the statement does not say), and EXECUTE
    revoked in the same transaction, so that no caller ever finds it open to PUBLIC.
    """
    with _transaction(connection):
        for statement in statements(repeatable(sql)):
            connection.exec_driver_sql(statement)


def build_index_concurrently(connection: Connection, name: str, definition: str) -> None:
    """CREATE INDEX CONCURRENTLY, on a connection in autocommit mode; one that an
    interrupted build left invalid is dropped and built again."""
    invalid = connection.execute(
        text("SELECT NOT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(:n)"),
        {"n": name},
    ).scalar()
    if invalid:
        connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    connection.exec_driver_sql(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {definition}")


@contextmanager
def _transaction(connection: Connection) -> Iterator[None]:
    """A transaction of our own on a connection in autocommit mode (where SQLAlchemy's
    begin() sends nothing): the batch's row locks must last until its commit."""
    connection.exec_driver_sql("BEGIN")
    try:
        yield
    except BaseException:
        connection.exec_driver_sql("ROLLBACK")
        raise
    connection.exec_driver_sql("COMMIT")


def backfill(connection: Connection, step: str, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Run the backfill ``step`` (ATTEMPT_COUNTS, DUE_CALLS or CALL_REACH) from where it
    stopped, a batch a transaction, on a connection in autocommit mode; how many calls (for
    CALL_REACH: rows) it changed."""
    owed, after = _pending(connection, step)
    if not owed:
        return 0
    work: Any = _WORK[step]
    changed = batches = deadlocks = 0
    started = time.monotonic()
    while True:
        try:
            with _transaction(connection):
                uuids = list(
                    connection.execute(_NEXT_BATCH, {"after": after, "size": batch_size}).scalars()
                )
                if not uuids:
                    connection.execute(_FINISHED, {"step": step})
                    break
                connection.execute(_LOCK_OWNERS, {"uuids": uuids})
                # A call deleted meanwhile drops out; the next batch starts after the last key.
                locked = list(connection.execute(_LOCK_BATCH, {"uuids": uuids}).scalars())
                result = connection.execute(work, {"uuids": locked})
                done = result.rowcount if step == ATTEMPT_COUNTS else int(result.scalar() or 0)
                connection.execute(_PROGRESS, {"key": uuids[-1], "step": step})
        except OperationalError as error:
            # A batch takes the owners' locks of many calls; a writer moving a person takes
            # two exclusively. PostgreSQL breaks a rare cycle by failing one of the two: if
            # that is the batch, it is done again (it was rolled back whole).
            if not isinstance(error.orig, psycopg.errors.DeadlockDetected) or deadlocks >= 100:
                raise
            deadlocks += 1
            logger.warning("backfill %s: a batch was chosen to break a deadlock; redoing it", step)
            continue
        changed, after, batches = changed + done, uuids[-1], batches + 1
    logger.info("backfill %s: %d calls changed in %d batches, %.1fs", step, changed, batches,
                time.monotonic() - started)  # fmt: skip
    return changed
