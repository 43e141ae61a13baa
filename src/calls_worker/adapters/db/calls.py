"""Calls and their attempts on PostgreSQL: what a command reads and writes of them."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from psycopg.types.json import Jsonb

from calls_worker.domain.model import Call, CallAttempt, CallStatus, CallType
from calls_worker.service.unit_of_work import Batch, CallRepository, References

from .adoption import OWNER_LOCK_CLASS
from .sweep import expire_batch, swept_events
from .transaction import OnTransaction

# A call's columns as commands and listings read them (``call_from_row``), its person's
# owning organization, and its attempts as JSON in the order a read of the call shows them.
CALL_COLUMNS = (
    "c.uuid, c.status, c.type, c.person_uuid, c.organization_uuid, c.pledge_case_uuid,"
    " c.requested_by, c.result, c.notes, c.external_metadata, c.completed_by, c.created_at,"
    " c.updated_at, c.completed_at, c.cancelled_at, c.expired_at"
)
OWNER = "(SELECT p.owning_organization_uuid FROM persons p WHERE p.uuid = c.person_uuid) AS owner"
ATTEMPTS_JSON = (
    "coalesce(json_agg(json_build_array(a.user_uuid, a.attempted_at)"
    " ORDER BY a.attempted_at, a.uuid), '[]'::json)"
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
# The people are found by primary key, those named and those of the calls named, in one
# array: with an OR of the two, PostgreSQL read every person to find a few.
LOCK_OWNERS = (
    f"SELECT count(pg_advisory_xact_lock_shared({OWNER_LOCK_CLASS}, key)) AS locked FROM ("
    " SELECT DISTINCT hashtext(p.owning_organization_uuid::text) AS key FROM persons p"
    " WHERE p.uuid = ANY(%(persons)s::uuid[]"
    " || ARRAY(SELECT c.person_uuid FROM calls c WHERE c.uuid = ANY(%(calls)s::uuid[])))"
    " ORDER BY 1) AS keys"
)
LOCK_CALL = (
    f"SELECT {CALL_COLUMNS}, {OWNER} FROM calls c WHERE c.uuid = %(uuid)s FOR UPDATE OF c"
)
LOAD_ATTEMPTS = (
    f"SELECT {ATTEMPTS_JSON} AS attempts_json FROM call_attempts a WHERE a.call_uuid = %(uuid)s"
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
# The first statements of a batch, after the outcomes its command ids have already
# (processed.py): the calls it names, locked in uuid order, so that two batches naming the
# same calls in another order wait for each other instead of deadlocking.
LOCK_CALLS = (
    "SELECT coalesce(array_agg(uuid), '{}') AS locked FROM (SELECT uuid FROM calls"
    " WHERE uuid = ANY(%(calls)s) ORDER BY uuid FOR UPDATE) AS locked"
)
# Then, in the same message, the calls so locked with their attempts: a statement of its own,
# after the locks, so it sees every attempt (see LOAD_ATTEMPTS); a command of the batch gets
# its call from here instead of a round trip of its own, unless an earlier one loaded it.
LOAD_CALLS = (
    f"SELECT {CALL_COLUMNS}, {OWNER}, (SELECT {ATTEMPTS_JSON} FROM call_attempts a"
    " WHERE a.call_uuid = c.uuid) AS attempts_json FROM calls c WHERE c.uuid = ANY(%(calls)s)"
)
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
class SqlCallRepository(OnTransaction, CallRepository):
    def get_for_update(self, call_uuid: UUID) -> Call | None:
        if (loaded := self._transaction.loaded.pop(call_uuid, None)) is not None:
            return loaded  # locked and read at the start of the batch, untouched since
        _, _, row, attempts = self._transaction.read_each(
            [LOCK_OWNERS, LOCK_OWNERS, LOCK_CALL, LOAD_ATTEMPTS],
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
        statement = expire_batch(now, limit, events=self._transaction.events)
        row = self._transaction.connection.execute(statement).one()
        if self._transaction.events and row.expiries:
            self._transaction.connection.execute(swept_events(now, row.expiries))
        return Batch(
            examined=row.examined,
            expired=row.expired,
            cleared=row.cleared,
            by_organization=dict(row.by_organization or {}),
            expired_calls=tuple(row.expired_calls or ()),
        )


