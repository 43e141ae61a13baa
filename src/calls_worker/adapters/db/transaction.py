"""One unit of work's transaction on a psycopg connection: its statements sent in as few
messages as PostgreSQL allows."""

from __future__ import annotations

import contextlib
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection

from calls_worker.domain.model import Call
from calls_worker.service.unit_of_work import CommandRefused


def _driver(connection: Connection) -> psycopg.Connection[Any]:
    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    return driver


def _drop_if_broken(connection: Connection) -> None:
    """SQLAlchemy did not see this error (psycopg was used directly): a connection that
    is gone must not go back to the pool."""
    driver = _driver(connection)
    if driver.closed or driver.broken:
        connection.invalidate()


class Transaction:
    """The statements of one unit of work, sent in as few messages as PostgreSQL allows.

    Commands speak the simple query protocol with values bound on the client (psycopg's
    ClientCursor quotes each one): a read goes out in one message with the BEGIN of its
    transaction, and the writes in one message with the COMMIT. A command thus costs one
    round trip for each read plus one, and one wake-up of the worker for each; psycopg's
    pipeline mode, the alternative, polls the socket a dozen times for the same.

    The connection is in autocommit mode while the unit of work has it, so psycopg sends
    no BEGIN of its own; the transaction status it reports tells whether ours is open.
    """

    def __init__(self, connection: Connection, *, events: bool = True) -> None:
        self.connection = connection
        self.events = events
        """Whether changes write their call events (CALLS_WORKER_EVENTS)."""
        self.driver = _driver(connection)
        self.driver.autocommit = True
        self.cursor = psycopg.ClientCursor(self.driver, row_factory=namedtuple_row)
        self.writes: list[tuple[object, str]] = []
        """Statements not sent yet, their values bound already, each with the tag of the
        command that wrote it (see ``tag``)."""
        self.tag: object = None
        """The command whose writes follow (a batch applies several in one transaction)."""
        self.batch = False
        """Whether a batch is applied: then refused statements raise CommandRefused."""
        self.loaded: dict[UUID, Call] = {}
        """Calls the batch locked and read in its first message, until a command takes one."""

    def write(self, sql: str, params: dict[str, Any]) -> None:
        self.writes.append((self.tag, self.cursor.mogrify(sql, params)))

    def write_first(self, sql: str, params: dict[str, Any]) -> None:
        """Before the other writes of the current command that are not sent yet."""
        at = next((i for i, (tag, _) in enumerate(self.writes) if tag == self.tag), None)
        self.writes.insert(len(self.writes) if at is None else at,
                           (self.tag, self.cursor.mogrify(sql, params)))  # fmt: skip

    def discard(self, tag: object) -> None:
        """Drop the writes of ``tag`` not sent yet."""
        self.writes = [(t, sql) for t, sql in self.writes if t != tag]

    def read(self, sql: str, params: dict[str, Any]) -> Any:
        """One row (or None); opens the transaction with it if none is open."""
        return self.read_each([sql], params)[0]

    def read_each(self, sqls: list[str], params: dict[str, Any]) -> list[Any]:
        """The first row (or None) of each statement (see ``read_all``)."""
        return [rows[0] if rows else None for rows in self.read_all(sqls, params)]

    def read_all(self, sqls: list[str], params: dict[str, Any]) -> list[list[Any]]:
        """The rows of each statement, sent in one message; each statement reads with a
        snapshot of its own (READ COMMITTED), taken when it starts.

        The writes not sent yet go first in the same message: a batch reads what its
        earlier commands wrote, and pays no round trip of its own for their writes.
        """
        pending, self.writes = self.writes, []
        began = self._send(
            [sql for _, sql in pending] + [self.cursor.mogrify(sql, params) for sql in sqls],
            tags={tag for tag, _ in pending} or {self.tag},
        )
        for _ in range(len(pending) + (1 if began else 0)):
            self.cursor.nextset()  # past the results of the BEGIN and the writes
        rows = [self.cursor.fetchall()]
        while self.cursor.nextset():
            rows.append(self.cursor.fetchall())
        return rows

    def begin(self) -> None:
        """Open the transaction now, for statements sent through SQLAlchemy."""
        self._send([])

    def flush(self, *, commit: bool) -> None:
        pending, self.writes = self.writes, []
        statements = [sql for _, sql in pending]
        if commit and (statements or self.open):
            statements.append("COMMIT")
        if statements:
            self._send(statements, tags={tag for tag, _ in pending})

    @property
    def open(self) -> bool:
        return self.driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def _send(self, statements: list[str], tags: set[object] | None = None) -> bool:
        """Send ``statements`` (with a BEGIN first if no transaction is open: True then).

        ``tags``: the commands whose writes the statements are. A statement PostgreSQL
        refuses for what it says (a value, a constraint, not the connection or another
        transaction) raises CommandRefused naming them, when a batch is being applied.
        """
        began = not self.open
        if began:
            statements = ["BEGIN", *statements]
        try:
            # No parameters: the values are in the text, and no "%" in it is a placeholder.
            self.cursor.execute("; ".join(statements))
        except psycopg.OperationalError:
            _drop_if_broken(self.connection)
            raise
        except psycopg.InterfaceError:
            raise
        except psycopg.Error as error:
            if self.batch:
                raise CommandRefused(tags or {self.tag}, error) from error
            raise
        except BaseException:
            # Interrupted while the server runs the statements (Celery's soft time limit
            # raises here): the connection is mid-query and must never be used again, nor
            # go back to the pool. Ask the server to stop, then close it.
            with contextlib.suppress(Exception):
                self.driver.cancel_safe(timeout=5)
            self.connection.invalidate()
            raise
        return began

    def rollback(self) -> None:
        self.writes.clear()
        if self.connection.invalidated:
            return  # gone, and its transaction with it
        self.connection.rollback()
        if not self.driver.closed:
            self.driver.rollback()  # what SQLAlchemy did not begin, it does not end

    def release(self) -> None:
        """Give the connection back as the pool lent it (not in autocommit mode)."""
        if self.connection.invalidated or self.driver.closed:
            return
        if self.open:  # a failed rollback leaves it unusable
            self.connection.invalidate()
            return
        self.driver.autocommit = False


class OnTransaction:
    """A repository of a unit of work: it reads and writes through its transaction."""

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction
