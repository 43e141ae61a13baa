"""The unit of work on PostgreSQL (SQLAlchemy Core over psycopg 3): one transaction over
the calls (calls.py), the processed-command record (processed.py), the call events
(events.py) and the service accounts (accounts.py); a command's or a batch's."""

from __future__ import annotations

from types import TracebackType
from typing import Self
from uuid import UUID

import psycopg
from sqlalchemy import Engine

from calls_worker.domain.outcome import Outcome
from calls_worker.service.unit_of_work import (
    CallUuidTaken,
    CommandRefused,
    DuplicateCommand,
    MissingReference,
    NoCallEvents,
    UnitOfWork,
)

from .accounts import SqlServiceAccounts
from .calls import LOAD_CALLS, LOCK_CALLS, LOCK_OWNERS, SqlCallRepository, call_from_row
from .events import SqlCallEvents
from .processed import DUPLICATE_COMMAND, PROCESSED_OUTCOMES, SqlProcessedCommands
from .transaction import Transaction

# A call's uuid is taken when the unique key on calls.uuid is violated, whatever the API
# named that constraint (an adopted table keeps its names).
_CALL_UUID_TAKEN = "Key (uuid)="
# The table whose foreign keys (person, organization, pledge case) a new call must meet.
_CALLS = "calls"


class SqlUnitOfWork(UnitOfWork):
    """A connection and its transaction, opened on enter and closed on exit.

    Reads go out at once, the first with the BEGIN. Writes wait for ``commit``, which
    sends them and the COMMIT in one message: a command costs its reads plus one round trip.
    """

    def __init__(self, engine: Engine, *, events: bool = True) -> None:
        self._engine = engine
        self._events = events

    def __enter__(self) -> Self:
        self._connection = self._engine.connect()
        try:
            self._transaction = Transaction(self._connection, events=self._events)
        except BaseException:
            self._connection.close()
            raise
        self.calls = SqlCallRepository(self._transaction)
        self.processed_commands = SqlProcessedCommands(self._transaction)
        self.service_accounts = SqlServiceAccounts(self._transaction)
        self.events = SqlCallEvents(self._transaction) if self._events else NoCallEvents()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            try:
                self._transaction.release()
            finally:
                self._connection.close()

    def commit(self) -> None:
        self._send(commit=True)
        self._connection.commit()  # the transaction is over; tell SQLAlchemy (no round trip)

    def flush(self) -> None:
        """Write what is pending without committing (its row locks are then held)."""
        self._send(commit=False)

    def begin_batch(
        self, command_ids: list[str], call_uuids: list[UUID], person_uuids: list[UUID]
    ) -> dict[str, Outcome]:
        # One message: BEGIN, the outcomes recorded already, the owners locked in key order,
        # then the calls in uuid order.
        self._transaction.batch = True
        params = {"ids": command_ids, "calls": sorted(set(call_uuids)),
                  "persons": sorted(set(person_uuids))}  # fmt: skip
        outcomes, _, _, locked, calls = self._transaction.read_all(
            [PROCESSED_OUTCOMES, LOCK_OWNERS, LOCK_OWNERS, LOCK_CALLS, LOAD_CALLS], params
        )  # fmt: skip
        # A call committed by another transaction between the lock's statement and the
        # load's (created there, say) is loaded but was not locked: lock again (owners
        # first, as before) and load again, until every call loaded is locked. Without it,
        # a command of this batch changed such a call on what it read, while another
        # transaction changed it too (the soak found an attempt added to a call cancelled
        # meanwhile).
        while {row.uuid for row in calls} - set(locked[0].locked):
            _, _, locked, calls = self._transaction.read_all(
                [LOCK_OWNERS, LOCK_OWNERS, LOCK_CALLS, LOAD_CALLS], params
            )  # fmt: skip
        self._transaction.loaded = {row.uuid: call_from_row(row, row.attempts_json)
                                    for row in calls}  # fmt: skip
        return {command_id: dict(outcome) for command_id, outcome in outcomes[0].outcomes.items()}

    def start_command(self, tag: object) -> None:
        self._transaction.tag = tag

    def discard_command(self, tag: object) -> None:
        self._transaction.discard(tag)

    def _send(self, *, commit: bool) -> None:
        try:
            self._transaction.flush(commit=commit)
        except CommandRefused:
            self.rollback()
            raise
        except psycopg.errors.UniqueViolation as error:
            self.rollback()
            constraint = error.diag.constraint_name
            if constraint in DUPLICATE_COMMAND:
                raise DuplicateCommand(str(error)) from error
            if error.diag.table_name == _CALLS and (error.diag.message_detail or "").startswith(
                _CALL_UUID_TAKEN
            ):
                raise CallUuidTaken(str(error)) from error
            raise
        except psycopg.errors.ForeignKeyViolation as error:
            self.rollback()
            if error.diag.table_name == _CALLS:
                raise MissingReference(str(error)) from error
            raise
        except psycopg.OperationalError:
            if not self._connection.invalidated:
                self.rollback()
            raise
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        self._transaction.rollback()
        self._transaction.batch = False
        self._transaction.loaded = {}
