"""The repositories and unit of work on PostgreSQL (SQLAlchemy Core over psycopg 3).

All the worker's SQL about calls lives here, including ``exhausted``: the SQL twin of
``domain.policy.is_exhausted``.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from uuid import UUID, uuid4

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json, Jsonb
from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    and_,
    case,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import aggregate_order_by

from calls_worker.domain.access import ServiceAccount
from calls_worker.domain.events import CallEvent
from calls_worker.domain.model import Call, CallAttempt, CallStatus, CallType
from calls_worker.domain.outcome import Outcome, call_json
from calls_worker.service.unit_of_work import (
    Batch,
    CallEvents,
    CallRepository,
    CallUuidTaken,
    CommandRefused,
    DuplicateCommand,
    MissingReference,
    NoCallEvents,
    ProcessedCommands,
    References,
    ServiceAccounts,
    UnitOfWork,
)

from .adoption import OWNER_LOCK_CLASS
from .tables import (
    call_attempts,
    call_events,
    calls,
    due_calls,
    organizations,
    persons,
)


def exhausted() -> ColumnElement[bool]:
    """``policy.is_exhausted`` in SQL, over ``calls`` joined to the person's owning organization.

    Served by the partial index ``calls_requested_managed_idx``.
    """
    return and_(
        calls.c.status == CallStatus.REQUESTED.value,
        calls.c.external_metadata.is_(None),
        organizations.c.max_call_attempts.is_not(None),
        calls.c.attempt_count >= organizations.c.max_call_attempts,
    )


def calls_with_owning_organization() -> Any:
    """``calls`` joined to the organization that owns the called person (it sets the limit)."""
    return calls.join(persons, persons.c.uuid == calls.c.person_uuid).join(
        organizations, organizations.c.uuid == persons.c.owning_organization_uuid
    )


# The reads of a command. Sent through psycopg directly, as the first statements of the
# transaction: its BEGIN goes out in the same message (see SqlUnitOfWork). The attempts are
# read by a statement of their own, after the lock: when the lock had to wait, PostgreSQL
# re-reads the locked row but not what a subquery of the same statement read before, so a
# subquery would miss an attempt that the transaction we waited for added. Nobody adds an
# attempt to a call without updating its row (the counting trigger), so once we hold the
# row, the attempts read next are all there are.
# The owning organizations of the people whose calls a transaction is about to change,
# locked (shared) in key order, before any call is locked. The triggers take the same locks
# when the changes are written (and then hold them already); a change of a person's owner or
# of a maximum takes them exclusively, in the same order, before it rechecks (and so locks)
# calls (migration 0005). Taken in command order, after the calls, they could close a
# cycle with such a change of the API's, and PostgreSQL would break it by failing one of
# the two transactions, perhaps the API's. The second statement, with a snapshot taken
# after the first's locks, adds the owner of anyone who moved meanwhile.
_LOCK_OWNERS = (
    f"SELECT count(pg_advisory_xact_lock_shared({OWNER_LOCK_CLASS}, key)) AS locked FROM ("
    " SELECT DISTINCT hashtext(p.owning_organization_uuid::text) AS key FROM persons p"
    " WHERE p.uuid = ANY(%(persons)s)"
    " OR p.uuid IN (SELECT c.person_uuid FROM calls c WHERE c.uuid = ANY(%(calls)s))"
    " ORDER BY 1) AS keys"
)
_LOCK_CALL = (
    "SELECT c.uuid, c.status, c.type, c.person_uuid, c.organization_uuid, c.pledge_case_uuid,"
    " c.requested_by, c.result, c.notes, c.external_metadata, c.completed_by, c.created_at,"
    " c.updated_at, c.completed_at, c.cancelled_at, c.expired_at,"
    " (SELECT p.owning_organization_uuid FROM persons p WHERE p.uuid = c.person_uuid) AS owner"
    " FROM calls c WHERE c.uuid = %(uuid)s FOR UPDATE OF c"
)
_LOAD_ATTEMPTS = (
    "SELECT coalesce(json_agg(json_build_array(a.user_uuid, a.attempted_at)"
    " ORDER BY a.attempted_at, a.uuid), '[]'::json) AS attempts_json"
    " FROM call_attempts a WHERE a.call_uuid = %(uuid)s"
)
_REFERENCES = (
    "SELECT (SELECT owning_organization_uuid FROM persons WHERE uuid = %(person)s) AS owner,"
    " EXISTS (SELECT FROM persons WHERE uuid = %(person)s) AS person,"
    " EXISTS (SELECT FROM organizations WHERE uuid = %(organization)s) AS organization,"
    " pc.person_uuid AS pledge_case_person, pp.owning_organization_uuid AS pledge_case_owner"
    " FROM (SELECT) AS one"
    " LEFT JOIN pledge_cases pc ON pc.uuid = %(pledge_case)s"
    " LEFT JOIN persons pp ON pp.uuid = pc.person_uuid"
)
_SERVICE_ACCOUNT = (
    "SELECT uuid, name, organization_uuid, scopes, disabled_at, certificate_sha256"
    " FROM worker_service_accounts WHERE uuid = %(uuid)s"
)
_PROCESSED_OUTCOME = "SELECT outcome FROM worker_processed_commands WHERE command_id = %(id)s"
# The first statements of a batch: the outcomes its command ids have already (redeliveries),
# and the calls it names, locked in uuid order, so that two batches naming the same calls in
# another order wait for each other instead of deadlocking.
_PROCESSED_OUTCOMES = (
    "SELECT coalesce(json_object_agg(command_id, outcome), '{}'::json) AS outcomes"
    " FROM worker_processed_commands WHERE command_id = ANY(%(ids)s)"
)
_LOCK_CALLS = (
    "SELECT coalesce(array_agg(uuid), '{}') AS locked FROM (SELECT uuid FROM calls"
    " WHERE uuid = ANY(%(calls)s) ORDER BY uuid FOR UPDATE) AS locked"
)
# Then, in the same message, the calls so locked with their attempts: a statement of its own,
# after the locks, so it sees every attempt (see _LOAD_ATTEMPTS); a command of the batch gets
# its call from here instead of a round trip of its own, unless an earlier one loaded it.
_LOAD_CALLS = (
    "SELECT c.uuid, c.status, c.type, c.person_uuid, c.organization_uuid, c.pledge_case_uuid,"
    " c.requested_by, c.result, c.notes, c.external_metadata, c.completed_by, c.created_at,"
    " c.updated_at, c.completed_at, c.cancelled_at, c.expired_at,"
    " (SELECT p.owning_organization_uuid FROM persons p WHERE p.uuid = c.person_uuid) AS owner,"
    " (SELECT coalesce(json_agg(json_build_array(a.user_uuid, a.attempted_at)"
    " ORDER BY a.attempted_at, a.uuid), '[]'::json) FROM call_attempts a"
    " WHERE a.call_uuid = c.uuid) AS attempts_json"
    " FROM calls c WHERE c.uuid = ANY(%(calls)s)"
)


def iso_timestamp(column: Any) -> ColumnElement[str]:
    """A timestamp as ``outcome.call_json`` writes it (Python's ``isoformat`` in UTC: no
    fraction when there is none, else six digits), so an event the sweep writes in SQL
    reads exactly as one a command writes in Python. NULL stays NULL."""
    utc = func.timezone("UTC", column)
    return case(
        (func.date_trunc("second", utc) == utc,
         func.to_char(utc, literal_column("""'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'"""))),
        else_=func.to_char(utc, literal_column("""'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'""")),
    )  # fmt: skip


def key(name: str) -> Any:
    """A JSON key in SQL, as a literal (a bound parameter's type could not be told)."""
    return literal_column(f"'{name}'")


def call_json_sql(call: Any) -> ColumnElement[Any]:
    """``outcome.call_json`` in SQL, over a row of ``calls`` (a table or a CTE with its
    columns): the call with its attempts, in the order commands load them."""
    a = call_attempts.alias("a")
    attempt = func.json_build_object(
        key("userUuid"), a.c.user_uuid, key("attemptedAt"), iso_timestamp(a.c.attempted_at)
    )
    attempts = (
        select(
            func.coalesce(
                func.json_agg(aggregate_order_by(attempt, a.c.attempted_at, a.c.uuid)),
                literal_column("'[]'::json"),
            )
        )
        .where(a.c.call_uuid == call.c.uuid)
        .scalar_subquery()
    )
    fields: list[Any] = [
        ("uuid", call.c.uuid),
        ("status", call.c.status),
        ("type", call.c.type),
        ("attempts", attempts),
        ("attemptCount", call.c.attempt_count),
        ("result", call.c.result),
        ("notes", call.c.notes),
        ("requestedBy", call.c.requested_by),
        ("personUuid", call.c.person_uuid),
        ("pledgeCaseUuid", call.c.pledge_case_uuid),
        ("organizationUuid", call.c.organization_uuid),
        ("externalMetadata", call.c.external_metadata),
        ("createdAt", iso_timestamp(call.c.created_at)),
        ("updatedAt", iso_timestamp(call.c.updated_at)),
        ("completedAt", iso_timestamp(call.c.completed_at)),
        ("cancelledAt", iso_timestamp(call.c.cancelled_at)),
        ("expiredAt", iso_timestamp(call.c.expired_at)),
    ]
    return func.json_build_object(*[part for name, value in fields for part in (key(name), value)])


def swept_event(now: datetime, expired: Any, owner: Any, max_call_attempts: Any) -> list[Any]:
    """The columns (EVENT_COLUMNS) of the ``call.expired`` event the sweep writes for a row
    of ``expired`` (calls as the UPDATE left them, RETURNING their columns), whose owning
    organization and its maximum are ``owner`` and ``max_call_attempts``."""
    return [
        func.gen_random_uuid(),
        literal_column("'call.expired'"),
        literal(now, call_events.c.occurred_at.type),
        expired.c.uuid,
        expired.c.organization_uuid,
        owner,
        call_json_sql(expired),
        func.json_build_object(
            key("by"), key("sweep"),
            key("attemptCount"), expired.c.attempt_count,
            key("maxCallAttempts"), max_call_attempts,
        ),
    ]  # fmt: skip


EVENT_COLUMNS = [
    "event_id", "kind", "occurred_at", "call_uuid", "organization_uuid",
    "owning_organization_uuid", "call", "expiry",
]  # fmt: skip


def _expire_batch(now: datetime, limit: int, *, events: bool = True) -> Any:
    """One sweep batch, in one statement (one round trip):

    - take up to ``limit`` rows of worker_due_calls, oldest first, that no other sweep holds;
    - of their calls, lock those no command holds, checking ``exhausted()`` again on the
      calls themselves, so that only a call exhausted now is expired;
    - expire them and remove their rows from worker_due_calls, with the rows of calls
      that had ended already (a stale entry must not hold a place in every batch);
    - with ``events``, return what each expired call's ``call.expired`` event says of its
      expiry (its owner and maximum), for the next statement to write the events with
      (_swept_events).

    The sweep keeps worker_due_calls itself here, so it asks the due-tracking trigger to
    stand aside for its transaction (``calls_worker.sweeping``), sparing a call of the
    trigger for every row it expires.
    """
    settings = [func.set_config("calls_worker.sweeping", "on", True).label("on")]
    if not events:
        # A batch lost in a crash before it reached the disk is redone by the next sweep
        # (the calls are still due), so it need not wait for the WAL flush. Not with
        # events: the relay could publish the event of a change the crash then took back.
        settings.append(func.set_config("synchronous_commit", "off", True).label("async"))
    stand_aside = select(*settings).cte("stand_aside")
    batch = (
        select(due_calls.c.call_uuid)
        .select_from(due_calls.join(stand_aside, true()))
        .order_by(due_calls.c.due_since)
        .limit(limit)
        .with_for_update(of=due_calls, skip_locked=True)
        .cte("batch")
    )
    # "= ANY(ARRAY(...))" rather than joins: it makes the planner fetch the few calls by
    # primary key instead of hashing every requested call for each batch.
    taken = (
        select(
            calls.c.uuid,
            organizations.c.uuid.label("owner"),
            organizations.c.max_call_attempts,
            exhausted().label("due"),
            and_(
                calls.c.status == CallStatus.REQUESTED.value, calls.c.external_metadata.is_(None)
            ).label("open"),
        )
        .select_from(calls_with_owning_organization())
        .where(calls.c.uuid == func.any(func.array(select(batch.c.call_uuid).scalar_subquery())))
        .with_for_update(of=calls, skip_locked=True)
        .cte("taken")
    )
    expired = (
        update(calls)
        .where(
            calls.c.uuid
            == func.any(func.array(select(taken.c.uuid).where(taken.c.due).scalar_subquery()))
        )
        .values(status=CallStatus.EXPIRED.value, expired_at=now, updated_at=now)
        .returning(calls.c.uuid)
        .cte("expired")
    )
    # A call that ended (or became external) cannot be due again whatever any organization
    # does, and this transaction holds its row: its entry is stale, whoever left it.
    cleared = select(taken.c.uuid).where(~taken.c.open).cte("cleared")
    removed = (
        delete(due_calls)
        .where(
            due_calls.c.call_uuid
            == func.any(
                func.array(
                    select(expired.c.uuid).union_all(select(cleared.c.uuid)).scalar_subquery()
                )
            )
        )
        .cte("removed")
    )
    by_owner = (
        select(taken.c.owner, func.count().label("expired"))
        .select_from(taken.join(expired, expired.c.uuid == taken.c.uuid))
        .group_by(taken.c.owner)
        .subquery("by_owner")
    )
    statement = select(
        select(func.count()).select_from(batch).scalar_subquery().label("examined"),
        select(func.count()).select_from(expired).scalar_subquery().label("expired"),
        select(func.count()).select_from(cleared).scalar_subquery().label("cleared"),
        select(func.json_object_agg(by_owner.c.owner, by_owner.c.expired))
        .scalar_subquery()
        .label("by_organization"),
        select(func.array_agg(expired.c.uuid)).scalar_subquery().label("expired_calls"),
    ).add_cte(removed)
    if events:
        # What each event's expiry says (the owner and its maximum the decision used); the
        # events themselves are written by the next statement (_swept_events).
        statement = statement.add_columns(
            select(func.json_agg(func.json_build_array(
                taken.c.uuid, taken.c.owner, taken.c.max_call_attempts)))
            .select_from(taken.join(expired, expired.c.uuid == taken.c.uuid))
            .scalar_subquery().label("expiries")
        )  # fmt: skip
    return statement


def _swept_events(now: datetime, expiries: list[list[Any]]) -> Any:
    """The ``call.expired`` events of the calls a sweep batch just expired, in a statement
    of their own: its snapshot sees every attempt committed before it, and the calls are
    this transaction's (locked). Written in the expiring statement itself, an event listed
    the attempts of that statement's snapshot: an attempt committed after it began, and
    before it reached (and locked) the call, was counted (attemptCount, read from the row
    it locked) but not listed (the soak found such an event)."""
    given = func.unnest(
        literal([UUID(str(e[0])) for e in expiries], ARRAY(PG_UUID(as_uuid=True))),
        literal([None if e[1] is None else UUID(str(e[1])) for e in expiries],
                ARRAY(PG_UUID(as_uuid=True))),
        literal([e[2] for e in expiries], ARRAY(Integer)),
    ).table_valued("uuid", "owner", "max_call_attempts").render_derived(name="given")  # fmt: skip
    return insert(call_events).from_select(
        EVENT_COLUMNS,
        select(*swept_event(now, calls, given.c.owner, given.c.max_call_attempts))
        .select_from(calls.join(given, given.c.uuid == calls.c.uuid))
        .order_by(calls.c.uuid),
    )


def _driver(connection: Connection) -> psycopg.Connection[Any]:
    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    return driver


def _drop_if_broken(connection: Connection) -> None:
    """SQLAlchemy did not see this error (psycopg was used directly): a connection that
    is gone must not go back to the pool."""
    driver = _driver(connection)
    if driver.closed or driver.broken:
        connection.invalidate()


def call_from_row(row: Any, attempts_json: list[list[str]]) -> Call:
    return Call(
        uuid=row.uuid,
        status=CallStatus(row.status),
        type=CallType(row.type),
        person_uuid=row.person_uuid,
        organization_uuid=row.organization_uuid,
        pledge_case_uuid=row.pledge_case_uuid,
        requested_by=row.requested_by,
        result=row.result,
        notes=row.notes,
        external_metadata=row.external_metadata,
        attempts=[
            CallAttempt(UUID(user), datetime.fromisoformat(at)) for user, at in attempts_json
        ],
        completed_by=row.completed_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
        cancelled_at=row.cancelled_at,
        expired_at=row.expired_at,
        owning_organization_uuid=row.owner,
    )


def _state(call: Call) -> dict[str, Any]:
    return {
        "uuid": call.uuid,
        "status": call.status.value,
        "result": call.result,
        "completed_by": call.completed_by,
        "completed_at": call.completed_at,
        "cancelled_at": call.cancelled_at,
        "expired_at": call.expired_at,
        "updated_at": call.updated_at,
    }


# The writes of a command, sent together at commit (see SqlUnitOfWork.commit).
_INSERT_PROCESSED = (
    "INSERT INTO worker_processed_commands"
    " (command_id, kind, call_uuid, outcome, service_account_uuid)"
    " VALUES (%(command_id)s, %(kind)s, %(call_uuid)s, %(outcome)s, %(account)s)"
)
_INSERT_CALL = (
    "INSERT INTO calls (uuid, status, type, person_uuid, organization_uuid, pledge_case_uuid,"
    " requested_by, result, notes, external_metadata, completed_by, created_at, updated_at,"
    " completed_at, cancelled_at, expired_at) VALUES (%(uuid)s, %(status)s, %(type)s,"
    " %(person_uuid)s, %(organization_uuid)s, %(pledge_case_uuid)s, %(requested_by)s,"
    " %(result)s, %(notes)s, %(external_metadata)s, %(completed_by)s, %(created_at)s,"
    " %(updated_at)s, %(completed_at)s, %(cancelled_at)s, %(expired_at)s)"
)
# The attempt's uuid is made here: the API's own table need not have a default for it.
_INSERT_ATTEMPT = (
    "INSERT INTO call_attempts (uuid, call_uuid, user_uuid, attempted_at)"
    " VALUES (%(uuid)s, %(call_uuid)s, %(user_uuid)s, %(attempted_at)s)"
)
_TOUCH_CALL = "UPDATE calls SET updated_at = %(updated_at)s WHERE uuid = %(uuid)s"
_SAVE_STATE = (
    "UPDATE calls SET status = %(status)s, result = %(result)s, completed_by = %(completed_by)s,"
    " completed_at = %(completed_at)s, cancelled_at = %(cancelled_at)s,"
    " expired_at = %(expired_at)s, updated_at = %(updated_at)s WHERE uuid = %(uuid)s"
)
# A command's event (domain/events.py), written after its change. The owning organization
# is read with the call a command changes; a new call's is looked up here, in the same
# message as the insert (no round trip of its own). An expiry by command carries the
# maximum of the owning organization, read the same way.
_INSERT_EVENT = (
    "INSERT INTO worker_call_events (event_id, kind, occurred_at, call_uuid,"
    " organization_uuid, owning_organization_uuid, call, expiry) VALUES (%(id)s, %(kind)s,"
    " %(at)s, %(call_uuid)s, %(organization)s, {owner}, %(call)s, {expiry})"
)
_OWNER = "%(owner)s"
_OWNER_OF_PERSON = "(SELECT owning_organization_uuid FROM persons WHERE uuid = %(person)s)"
_EXPIRY_BY_COMMAND = (
    "json_build_object('by', 'command', 'attemptCount', %(attempts)s::int, 'maxCallAttempts',"
    " (SELECT max_call_attempts FROM organizations WHERE uuid = {owner}))"
)
_INSERT_EVENTS = {
    (known_owner, expiry): _INSERT_EVENT.format(
        owner=(owner := _OWNER if known_owner else _OWNER_OF_PERSON),
        expiry=_EXPIRY_BY_COMMAND.format(owner=owner) if expiry else "NULL",
    )
    for known_owner in (True, False)
    for expiry in (True, False)
}
# Unique constraints whose violation at commit means something to the handlers: a command
# id recorded already, in either of the tables of outcomes (migration 0008).
_DUPLICATE_COMMAND = {"worker_processed_commands_pkey", "worker_processed_commands_b_pkey"}
# A call's uuid is taken when the unique key on calls.uuid is violated, whatever the API
# named that constraint (an adopted table keeps its names).
_CALL_UUID_TAKEN = "Key (uuid)="
# The table whose foreign keys (person, organization, pledge case) a new call must meet.
_CALLS = "calls"


class _Transaction:
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


class SqlCallRepository(CallRepository):
    def __init__(self, transaction: _Transaction) -> None:
        self._transaction = transaction

    def get_for_update(self, call_uuid: UUID) -> Call | None:
        if (loaded := self._transaction.loaded.pop(call_uuid, None)) is not None:
            return loaded  # locked and read at the start of the batch, untouched since
        _, _, row, attempts = self._transaction.read_each(
            [_LOCK_OWNERS, _LOCK_OWNERS, _LOCK_CALL, _LOAD_ATTEMPTS],
            {"uuid": call_uuid, "calls": [call_uuid], "persons": []},
        )
        return None if row is None else call_from_row(row, attempts.attempts_json)

    def add(self, call: Call) -> None:
        self._transaction.write(
            _INSERT_CALL,
            {
                **_state(call),
                "type": call.type.value,
                "person_uuid": call.person_uuid,
                "organization_uuid": call.organization_uuid,
                "pledge_case_uuid": call.pledge_case_uuid,
                "requested_by": call.requested_by,
                "notes": call.notes,
                # SQL NULL, never JSON null, for a call managed here.
                "external_metadata": None
                if call.external_metadata is None
                else Jsonb(call.external_metadata),
                "created_at": call.created_at,
            },
        )
        for a in call.attempts:
            self._transaction.write(
                _INSERT_ATTEMPT,
                {"uuid": uuid4(), "call_uuid": call.uuid, "user_uuid": a.user_uuid,
                 "attempted_at": a.attempted_at},
            )  # fmt: skip

    def add_attempt(self, call: Call, attempt: CallAttempt) -> None:
        self._transaction.write(
            _INSERT_ATTEMPT,
            {"uuid": uuid4(), "call_uuid": call.uuid, "user_uuid": attempt.user_uuid,
             "attempted_at": attempt.attempted_at},
        )  # fmt: skip
        self._transaction.write(_TOUCH_CALL, {"uuid": call.uuid, "updated_at": call.updated_at})

    def save_state(self, call: Call) -> None:
        self._transaction.write(_SAVE_STATE, _state(call))

    def references(
        self, person_uuid: UUID, organization_uuid: UUID, pledge_case_uuid: UUID | None
    ) -> References:
        row = self._transaction.read(
            _REFERENCES,
            {"person": person_uuid, "organization": organization_uuid,
             "pledge_case": pledge_case_uuid},
        )  # fmt: skip
        assert row is not None
        return References(
            person_exists=row.person,
            organization_exists=row.organization,
            pledge_case_person_uuid=row.pledge_case_person,
            person_owning_organization_uuid=row.owner,
            pledge_case_owning_organization_uuid=row.pledge_case_owner,
        )

    def expire_exhausted(self, now: datetime, limit: int) -> Batch:
        self._transaction.begin()
        statement = _expire_batch(now, limit, events=self._transaction.events)
        row = self._transaction.connection.execute(statement).one()
        if self._transaction.events and row.expiries:
            self._transaction.connection.execute(_swept_events(now, row.expiries))
        return Batch(
            examined=row.examined,
            expired=row.expired,
            cleared=row.cleared,
            by_organization=dict(row.by_organization or {}),
            expired_calls=tuple(row.expired_calls or ()),
        )


class SqlProcessedCommands(ProcessedCommands):
    def __init__(self, transaction: _Transaction) -> None:
        self._transaction = transaction

    def get(self, command_id: str) -> Outcome | None:
        row = self._transaction.read(_PROCESSED_OUTCOME, {"id": command_id})
        return None if row is None else dict(row.outcome)

    def add(
        self, command_id: str, kind: str, call_uuid: UUID | None, outcome: Outcome,
        service_account_uuid: UUID | None = None,
    ) -> None:  # fmt: skip
        # First among the writes: a redelivery then fails before doing any of its work.
        self._transaction.write_first(
            _INSERT_PROCESSED,
            {"command_id": command_id, "kind": kind, "call_uuid": call_uuid,
             "outcome": Jsonb(outcome), "account": service_account_uuid},
        )  # fmt: skip


class SqlCallEvents(CallEvents):
    def __init__(self, transaction: _Transaction) -> None:
        self._transaction = transaction

    def add(self, event: CallEvent) -> None:
        call = event.call
        owner = call.owning_organization_uuid  # None for a new call: looked up in SQL
        self._transaction.write(
            _INSERT_EVENTS[(owner is not None, event.expired_by_command)],
            {"id": event.event_id, "kind": event.kind, "at": event.occurred_at,
             "call_uuid": call.uuid, "organization": call.organization_uuid, "owner": owner,
             "person": call.person_uuid, "call": Json(call_json(call)),
             "attempts": call.attempt_count},
        )  # fmt: skip


class SqlServiceAccounts(ServiceAccounts):
    def __init__(self, transaction: _Transaction) -> None:
        self._transaction = transaction

    def get(self, uuid: UUID) -> ServiceAccount | None:
        row = self._transaction.read(_SERVICE_ACCOUNT, {"uuid": uuid})
        return None if row is None else service_account_from_row(row)


def service_account_from_row(row: Any) -> ServiceAccount:
    return ServiceAccount(
        uuid=row.uuid,
        name=row.name,
        organization_uuid=row.organization_uuid,
        scopes=frozenset(row.scopes),
        disabled_at=row.disabled_at,
        certificate_sha256=row.certificate_sha256,
    )


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
            self._transaction = _Transaction(self._connection, events=self._events)
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
            [_PROCESSED_OUTCOMES, _LOCK_OWNERS, _LOCK_OWNERS, _LOCK_CALLS, _LOAD_CALLS], params
        )  # fmt: skip
        # A call committed by another transaction between the lock's statement and the
        # load's (created there, say) is loaded but was not locked: lock again (owners
        # first, as before) and load again, until every call loaded is locked. Without it,
        # a command of this batch changed such a call on what it read, while another
        # transaction changed it too (the soak found an attempt added to a call cancelled
        # meanwhile).
        while {row.uuid for row in calls} - set(locked[0].locked):
            _, _, locked, calls = self._transaction.read_all(
                [_LOCK_OWNERS, _LOCK_OWNERS, _LOCK_CALLS, _LOAD_CALLS], params
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
            if constraint in _DUPLICATE_COMMAND:
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
