"""Listing calls: the access rules of the query, then a page from the store."""

from __future__ import annotations

import abc
from uuid import UUID

from calls_worker.domain import access
from calls_worker.domain.access import AccessPolicy, Caller, ServiceAccount
from calls_worker.domain.commands import ListCalls
from calls_worker.domain.errors import DomainError
from calls_worker.domain.model import Call
from calls_worker.domain.outcome import Outcome, call_json, failed
from calls_worker.domain.paging import Position, decode_cursor, encode_cursor


class CallReader(abc.ABC):
    """Reads for the listing (no transaction of a command's)."""

    @abc.abstractmethod
    def service_account(self, uuid: UUID) -> ServiceAccount | None:
        """The account as it is now; None if unknown."""

    @abc.abstractmethod
    def cursor_key(self) -> bytes:
        """The key that signs cursors (the same for every worker of a database)."""

    @abc.abstractmethod
    def page(
        self, query: ListCalls, reach: UUID | None, after: Position | None, limit: int
    ) -> list[Call]:
        """Up to ``limit`` calls matching the query's filters, newest first (``created_at``,
        then ``uuid``, both descending), strictly after ``after``, with their attempts; only
        calls reached by the organization ``reach`` when it is given."""


def list_calls(
    reader: CallReader, query: ListCalls, *, policy: AccessPolicy, signer_sha256: str | None
) -> Outcome:
    """``{"ok": true, "calls": [...], "nextCursor": ...}``, or the error outcome (a cursor
    that does not verify is invalid; then forbidden; calls out of reach are not listed)."""
    try:
        key = reader.cursor_key()
        after = None if query.cursor is None else decode_cursor(query.cursor, query, key)
        account = None
        if query.service_account_uuid is not None or policy.require_service_account:
            named = query.service_account_uuid
            stored = None if named is None else reader.service_account(named)
            account = access.authorize(
                policy, Caller(named, signer_sha256), stored, access.SCOPE_OF["list"]
            )
    except DomainError as error:
        return failed(error)
    reach = None if account is None else account.organization_uuid
    calls = reader.page(query, reach, after, query.limit + 1)
    more = len(calls) > query.limit
    calls = calls[: query.limit]
    next_cursor = (
        encode_cursor(Position(calls[-1].created_at, calls[-1].uuid), query, key) if more else None
    )
    return {"ok": True, "calls": [call_json(call) for call in calls], "nextCursor": next_cursor}
