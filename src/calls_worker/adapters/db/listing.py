"""Pages of calls on PostgreSQL: one index range a page, at any depth.

A service account's page reads ``worker_call_reach`` (a row per organization that reaches a
call, kept by triggers: migration 0007) backwards from the cursor; without one, ``calls``
itself, through the index of the filter given (performing organization, person) or of
creation time. Each page is one statement, attempts included.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import Engine, text

from calls_worker.adapters.db.accounts import service_account
from calls_worker.adapters.db.calls import ATTEMPTS_JSON, CALL_COLUMNS, call_from_row
from calls_worker.domain.access import ServiceAccount
from calls_worker.domain.commands import ListCalls
from calls_worker.domain.model import Call
from calls_worker.domain.paging import Position
from calls_worker.service.listing import CallReader

_COLUMNS = f"{CALL_COLUMNS}, NULL::uuid AS owner"
_ATTEMPTS = (
    f"(SELECT {ATTEMPTS_JSON} FROM call_attempts a WHERE a.call_uuid = c.uuid) AS attempts_json"
)
_FILTERS = {
    "organization_uuid": "c.organization_uuid = :organization_uuid",
    "person_uuid": "c.person_uuid = :person_uuid",
    "status": "c.status = :status",
    "type": "c.type = :type",
}


def page_statement(query: ListCalls, reach: UUID | None, after: Position | None) -> str:
    """The SQL of a page (bound parameters: the filters, ``reach``, ``after_*``, ``limit``)."""
    if reach is not None:
        source = "worker_call_reach r JOIN calls c ON c.uuid = r.call_uuid"
        key, conditions = "r.created_at, r.call_uuid", ["r.organization_uuid = :reach"]
    else:
        source, key, conditions = "calls c", "c.created_at, c.uuid", []
    conditions += [sql for name, sql in _FILTERS.items() if getattr(query, name) is not None]
    if after is not None:
        conditions.append(f"({key}) < (:after_created_at, :after_uuid)")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    order = ", ".join(f"{column} DESC" for column in key.split(", "))
    return f"SELECT {_COLUMNS}, {_ATTEMPTS} FROM {source}{where} ORDER BY {order} LIMIT :limit"


def page_parameters(
    query: ListCalls, reach: UUID | None, after: Position | None, limit: int
) -> dict[str, Any]:
    return {
        "organization_uuid": query.organization_uuid,
        "person_uuid": query.person_uuid,
        "status": None if query.status is None else query.status.value,
        "type": None if query.type is None else query.type.value,
        "reach": reach,
        "after_created_at": None if after is None else after.created_at,
        "after_uuid": None if after is None else after.uuid,
        "limit": limit,
    }


class SqlCallReader(CallReader):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._key: bytes | None = None

    def service_account(self, uuid: UUID) -> ServiceAccount | None:
        return service_account(self.engine, uuid)

    def cursor_key(self) -> bytes:
        if self._key is None:
            with self.engine.connect() as connection:
                value = connection.execute(
                    text("SELECT value FROM worker_secrets WHERE name = 'listing_cursor_key'")
                ).scalar_one()
            self._key = bytes.fromhex(value)
        return self._key

    def page(
        self, query: ListCalls, reach: UUID | None, after: Position | None, limit: int
    ) -> list[Call]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(page_statement(query, reach, after)),
                page_parameters(query, reach, after, limit),
            ).all()
        return [call_from_row(row, row.attempts_json) for row in rows]
