"""Which errors say the database is away, or its schema older than this release's (never a
reason to give a command up), and which are errors of a database that answers (they spend
the retry budget)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

from calls_worker.worker.settling import database_away


def wrapped(error: Exception) -> OperationalError:
    """As SQLAlchemy raises it."""
    return OperationalError("SELECT 1", {}, error)


@pytest.mark.parametrize(
    ("error", "away"),
    [
        (psycopg.OperationalError("connection refused"), True),  # no SQLSTATE: client side
        (wrapped(psycopg.OperationalError("server closed the connection")), True),
        (errors.CannotConnectNow("the database system is starting up"), True),
        (errors.AdminShutdown("terminating connection"), True),
        (errors.CrashShutdown("crash"), True),
        (errors.ConnectionFailure("connection failure"), True),
        # a standby: the writable primary is elsewhere (a failover, a URL without
        # target_session_attrs=read-write)
        (errors.ReadOnlySqlTransaction("read-only transaction"), True),
        (InterfaceError("SELECT 1", {}, psycopg.InterfaceError("closed")), True),
        (psycopg.InterfaceError("the connection is closed"), True),
        (errors.DeadlockDetected("deadlock detected"), False),
        (wrapped(errors.SerializationFailure("could not serialize")), False),
        (errors.LockNotAvailable("lock timeout"), False),
        (errors.QueryCanceled("statement timeout"), False),
        # a schema older than this release's: it waits for migrate as for a database away
        (errors.UndefinedTable("relation does not exist"), True),
        (errors.UndefinedColumn("column does not exist"), True),
        (ProgrammingError("SELECT f()", {}, errors.UndefinedFunction("no function")), True),
        (errors.UndefinedObject("type does not exist"), True),
        (errors.SyntaxError("syntax error"), False),
        (ProgrammingError("SELECT 1", {}, errors.InsufficientPrivilege("denied")), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_database_away(error: Exception, away: bool) -> None:
    assert database_away(error) is away
