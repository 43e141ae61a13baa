"""Listing calls on PostgreSQL: order, filters, reach, cursors, and paging while calls
are being created."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import Engine

from calls_worker.adapters.db.directory import add_service_account, disable_service_account
from calls_worker.adapters.db.listing import SqlCallReader
from calls_worker.domain.access import OPEN, AccessPolicy
from calls_worker.domain.commands import parse_list_calls
from calls_worker.domain.outcome import Outcome
from calls_worker.service.listing import list_calls
from tests.db_world import Db

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _call(db: Db, person: UUID, performer: UUID, created_at: datetime, **fields: Any) -> UUID:
    uuid: UUID = fields.pop("uuid", uuid4())
    db.sql(
        "INSERT INTO calls (uuid, status, type, person_uuid, organization_uuid, created_at,"
        " updated_at) VALUES (:u, :s, :t, :p, :o, :c, :c)",
        u=uuid, s=fields.get("status", "requested"), t=fields.get("type", "verification"),
        p=person, o=performer, c=created_at,
    )  # fmt: skip
    return uuid


def _list(engine: Engine, policy: AccessPolicy = OPEN, **query: Any) -> Outcome:
    return list_calls(SqlCallReader(engine), parse_list_calls(query), policy=policy,
                      signer_sha256=None)  # fmt: skip


def _all_pages(engine: Engine, **query: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = _list(engine, **query, **({"cursor": cursor} if cursor else {}))
        assert page["ok"], page
        seen += [call["uuid"] for call in page["calls"]]
        cursor = page["nextCursor"]
        if cursor is None:
            return seen


@pytest.fixture
def scene(db: Db) -> dict[str, Any]:
    """Two organizations; calls at random times, some sharing a creation time."""
    db.sql("TRUNCATE calls CASCADE")
    a, b = db.organization(), db.organization()
    pa, pb = db.person(a), db.person(b)
    rng = random.Random(7)
    calls = []
    for _ in range(57):
        created = T0 + timedelta(minutes=rng.randrange(20))  # ties are frequent
        person, performer = rng.choice([(pa, a), (pa, b), (pb, a), (pb, b)])
        status = rng.choice(["requested", "completed"])
        uuid = _call(db, person, performer, created, status=status)
        calls.append({"uuid": uuid, "created": created, "person": person, "performer": performer,
                      "owner": a if person == pa else b, "status": status})  # fmt: skip
    return {"a": a, "b": b, "pa": pa, "pb": pb, "calls": calls}


def _newest_first(calls: list[dict[str, Any]]) -> list[str]:
    ordered = sorted(calls, key=lambda c: (c["created"], c["uuid"]), reverse=True)
    return [str(c["uuid"]) for c in ordered]


@pytest.mark.parametrize("limit", [1, 7, 25, 100])
def test_pages_return_every_call_once_newest_first(engine: Engine, scene: dict[str, Any],
                                                   limit: int) -> None:  # fmt: skip
    assert _all_pages(engine, limit=limit) == _newest_first(scene["calls"])


def test_filters_narrow_the_listing(engine: Engine, scene: dict[str, Any]) -> None:
    calls, a, pb = scene["calls"], scene["a"], scene["pb"]
    assert _all_pages(engine, organizationUuid=str(a), limit=5) == _newest_first(
        [c for c in calls if c["performer"] == a]
    )
    assert _all_pages(engine, personUuid=str(pb), status="completed", limit=5) == _newest_first(
        [c for c in calls if c["person"] == pb and c["status"] == "completed"]
    )
    assert _all_pages(engine, type="winback") == []


def test_a_service_account_lists_only_what_it_reaches(db: Db, engine: Engine,
                                                      scene: dict[str, Any]) -> None:  # fmt: skip
    a, b, calls = scene["a"], scene["b"], scene["calls"]
    account = add_service_account(engine, "reader", a, ["calls:read"])
    reached = [c for c in calls if a in (c["performer"], c["owner"])]
    assert len(reached) < len(calls)
    assert _all_pages(engine, serviceAccountUuid=str(account), limit=4) == _newest_first(reached)
    # Filters apply within the reach: calls performed by B are reached only through pA.
    assert _all_pages(engine, serviceAccountUuid=str(account), organizationUuid=str(b)) == (
        _newest_first([c for c in reached if c["performer"] == b])
    )


def test_listing_needs_the_read_scope_and_an_enabled_account(
    engine: Engine, scene: dict[str, Any]
) -> None:
    a = scene["a"]
    writer = add_service_account(engine, "writer", a, ["calls:create"])
    refused = _list(engine, serviceAccountUuid=str(writer))
    assert refused["error"]["code"] == "forbidden"
    assert "calls:read" in refused["error"]["message"]
    reader = add_service_account(engine, "reader", a, ["calls:read"])
    disable_service_account(engine, reader)
    assert _list(engine, serviceAccountUuid=str(reader))["error"]["code"] == "forbidden"
    required = AccessPolicy(require_service_account=True)
    assert _list(engine, required)["error"]["code"] == "forbidden"


def test_a_cursor_that_was_tampered_with_is_invalid(engine: Engine, scene: dict[str, Any]) -> None:
    first = _list(engine, limit=3)
    cursor = first["nextCursor"]
    body, mac = cursor.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    for bad in (f"{flipped}.{mac}", "not a cursor", f"{body}.{mac[::-1]}", cursor + "x"):
        refused = _list(engine, limit=3, cursor=bad)
        assert refused["error"]["code"] == "invalid", bad
        assert [d["field"] for d in refused["error"]["details"]] == ["cursor"]
    # A cursor made for one query does not continue another.
    other = _list(engine, limit=3, cursor=cursor, organizationUuid=str(scene["a"]))
    assert other["error"]["code"] == "invalid"
    # The page size may change between pages.
    assert _list(engine, limit=10, cursor=cursor)["ok"]


def test_paging_while_calls_are_created_returns_each_existing_call_once(
    db: Db, engine: Engine, scene: dict[str, Any]
) -> None:
    """Creates run in another thread between and during pages, at new and at old times; the
    calls that existed at the first page come back exactly once, in order."""
    existing = _newest_first(scene["calls"])
    stop = threading.Event()
    created: list[UUID] = []

    def create() -> None:
        rng = random.Random(11)
        while not stop.is_set():
            when = T0 + timedelta(minutes=rng.randrange(-5, 40), seconds=rng.random())
            created.append(_call(db, scene["pa"], scene["b"], when))

    thread = threading.Thread(target=create)
    thread.start()
    try:
        seen = _all_pages(engine, limit=4)
    finally:
        stop.set()
        thread.join()
    assert created, "no call was created while paging"
    old = [uuid for uuid in seen if uuid in set(existing)]
    assert old == existing
    assert len(seen) == len(set(seen))
