"""Keyset pagination of calls, newest first, with opaque cursors that cannot be forged.

A cursor names the last call of a page (its ``createdAt`` and ``uuid``): the next page is
every call strictly before it in the order (``createdAt`` descending, then ``uuid``
descending). Calls created while someone pages go before the first page or into a later
one, so every call that existed at the first page is returned exactly once, in order.

A cursor is signed (HMAC-SHA-256, a key the database keeps) over its position and the
query it continues (service account and filters): one that was changed, made up, or used
for another query is refused as invalid, naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from calls_worker.domain.commands import ListCalls
from calls_worker.domain.errors import FieldError, InvalidCommand

_MAC_BYTES = 16


@dataclass(frozen=True)
class Position:
    """Where a page ended: its last call's creation time and uuid."""

    created_at: datetime
    uuid: UUID


def _query_of(query: ListCalls) -> bytes:
    """What a cursor is bound to: the query without its page size and cursor."""
    bound = query.model_dump(mode="json", exclude={"limit", "cursor"})
    return json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, query: ListCalls, position: bytes) -> bytes:
    return hmac.new(key, _query_of(query) + b"\n" + position, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_cursor(position: Position, query: ListCalls, key: bytes) -> str:
    raw = json.dumps([position.created_at.isoformat(), str(position.uuid)]).encode()
    return f"{_b64(raw)}.{_b64(_mac(key, query, raw))}"


def decode_cursor(cursor: str, query: ListCalls, key: bytes) -> Position:
    """The position ``cursor`` names; InvalidCommand naming ``cursor`` if it was not made
    by ``encode_cursor`` for this query with this key."""
    try:
        body, mac = cursor.split(".")
        raw, given = _unb64(body), _unb64(mac)
    except (ValueError, binascii.Error) as error:
        raise _bad("does not parse") from error
    if not hmac.compare_digest(given, _mac(key, query, raw)):
        raise _bad("was changed, or was made for another query (service account or filters)")
    created_at, uuid = json.loads(raw)
    return Position(datetime.fromisoformat(created_at), UUID(uuid))


def _bad(reason: str) -> InvalidCommand:
    return InvalidCommand(f"the cursor {reason}", [FieldError("cursor", reason)])
