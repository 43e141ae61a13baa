"""Call events on the real database: every change a command or the sweep makes writes
exactly one event in its own transaction, and nothing else writes one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import Engine

from calls_worker.adapters.db.events import (
    backlog,
    lane_of,
    prune_published,
    relay_batch,
    set_events_retention,
    tail,
)
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.outcome import Outcome, call_json
from calls_worker.service.apply import BatchEntry, handle, handle_batch
from calls_worker.service.sweep import expire_exhausted_calls
from calls_worker.wire import EVENT_KINDS
from tests.db_world import ISSUED, Db

SWEPT_AT = datetime(2026, 4, 1, 6, 0, 0, 250_000, tzinfo=UTC)


@pytest.fixture
def world(db: Db) -> tuple[UUID, UUID]:
    organization = db.organization(3)
    return organization, db.person(organization)


def send(db: Db, kind: CommandKind, payload: dict[str, Any], command_id: str | None = None,
         *, events: bool = True) -> Outcome:  # fmt: skip
    command = parse_command(kind, {"issuedAt": ISSUED, **payload})
    return handle(command_id or str(uuid4()), command, SqlUnitOfWork(db.engine, events=events))


def create(db: Db, world: tuple[UUID, UUID], **fields: Any) -> Outcome:
    organization, person = world
    return send(db, "create", {"personUuid": str(person), "organizationUuid": str(organization),
                               **fields})  # fmt: skip


def attempt(call: str, at: str = ISSUED) -> dict[str, Any]:
    return {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": at}


def sweep(engine: Engine, *, events: bool = True) -> int:
    return expire_exhausted_calls(
        lambda: SqlUnitOfWork(engine, events=events), SWEPT_AT, 100
    ).expired


def test_each_command_writes_one_event_with_the_outcomes_call(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    organization, person = world
    performing = db.organization(None)
    created = send(db, "create", {"personUuid": str(person), "organizationUuid": str(performing)})
    call = created["call"]["uuid"]
    attempted = send(db, "add_attempt", attempt(call, "2026-03-01T08:00:00.123456Z"))
    expired = send(db, "expire", {"callUuid": call})
    events = db.events(UUID(call))
    assert [e["kind"] for e in events] == ["call.created", "call.attempt_added", "call.expired"]
    for event, outcome in zip(events, (created, attempted, expired), strict=True):
        assert event["call"] == outcome["call"]
        assert event["callUuid"] == call
        assert event["organizationUuid"] == str(performing)
        assert event["owningOrganizationUuid"] == str(organization)
        assert event["occurredAt"] == ISSUED
        assert UUID(event["eventId"])
    assert "expiry" not in events[0]
    assert "expiry" not in events[1]
    assert events[2]["expiry"] == {"by": "command", "attemptCount": 1, "maxCallAttempts": 3}
    assert [e["sequence"] for e in events] == sorted(e["sequence"] for e in events)
    assert len({e["eventId"] for e in events}) == 3


@pytest.mark.parametrize("ending", ["complete", "cancel"])
def test_an_ending_writes_its_event(db: Db, world: tuple[UUID, UUID], ending: CommandKind) -> None:
    call = create(db, world)["call"]["uuid"]
    extra = {"userUuid": str(uuid4()), "result": "reached"} if ending == "complete" else {}
    outcome = send(db, ending, {"callUuid": call, **extra})
    events = db.events(UUID(call))
    kind = {"complete": "call.completed", "cancel": "call.cancelled"}[ending]
    assert [e["kind"] for e in events] == ["call.created", kind]
    assert events[1]["call"] == outcome["call"]


def test_what_changes_nothing_writes_nothing(db: Db, world: tuple[UUID, UUID]) -> None:
    """A broken rule, a redelivery, a taken uuid, a missing person: no event."""
    uuid = str(uuid4())
    create(db, world, uuid=uuid)
    assert len(db.events()) == 1
    assert create(db, world, uuid=uuid)["error"]["code"] == "conflict"  # uuid taken
    organization, _ = world
    nobody = {"personUuid": str(uuid4()), "organizationUuid": str(organization)}
    missing = send(db, "create", nobody)
    assert missing["error"]["code"] == "not_found"
    send(db, "cancel", {"callUuid": uuid}, command_id="cancel-1")
    send(db, "cancel", {"callUuid": uuid}, command_id="cancel-1")  # redelivered
    assert send(db, "expire", {"callUuid": uuid})["error"]["code"] == "conflict"  # ended
    assert send(db, "add_attempt", attempt(str(uuid4())))["error"]["code"] == "not_found"
    assert [e["kind"] for e in db.events()] == ["call.created", "call.cancelled"]


def test_an_external_call_is_created_once_whatever_its_status(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    outcome = create(db, world, externalMetadata={"source": "crm"}, status="expired",
                     attempts=[{"userUuid": str(uuid4()), "attemptedAt": ISSUED}])  # fmt: skip
    (event,) = db.events()
    assert event["kind"] == "call.created"
    assert event["call"] == outcome["call"]


def test_the_sweep_writes_the_call_as_a_command_would_show_it(db: Db, engine: Engine) -> None:
    """The sweep's event is built in SQL; its call reads exactly as ``call_json`` renders
    the same call (timestamps with and without a fraction, attempts in load order)."""
    organization = db.organization(2)
    person = db.person(organization)
    call = UUID(send(db, "create", {"personUuid": str(person), "organizationUuid":
                                    str(organization), "notes": "é \"quoted\"",
                                    "requestedBy": str(uuid4())})["call"]["uuid"])  # fmt: skip
    send(db, "add_attempt", attempt(str(call), "2026-03-01T08:00:00.000001Z"))
    send(db, "add_attempt", attempt(str(call), "2026-02-28T23:59:59Z"))
    assert sweep(engine) == 1
    with SqlUnitOfWork(engine) as uow:
        loaded = uow.calls.get_for_update(call)
    assert loaded is not None
    *_, event = db.events(call)
    assert event["kind"] == "call.expired"
    assert event["call"] == call_json(loaded)
    assert event["call"]["attempts"][0]["attemptedAt"] == "2026-02-28T23:59:59+00:00"
    assert event["call"]["expiredAt"] == "2026-04-01T06:00:00.250000+00:00"
    assert event["occurredAt"] == SWEPT_AT.isoformat()
    assert event["expiry"] == {"by": "sweep", "attemptCount": 2, "maxCallAttempts": 2}
    assert event["owningOrganizationUuid"] == str(organization)


def test_the_sweep_writes_one_event_per_call_it_expires(db: Db, engine: Engine) -> None:
    organization = db.organization(1)
    due = [db.call(db.person(organization), organization, attempts=1) for _ in range(7)]
    waiting = db.call(db.person(organization), organization, attempts=0)
    assert expire_exhausted_calls(lambda: SqlUnitOfWork(engine), SWEPT_AT, 3).expired == 7
    assert sweep(engine) == 0
    events = db.events()
    assert sorted(e["callUuid"] for e in events) == sorted(map(str, due))
    assert {e["kind"] for e in events} == {"call.expired"}
    assert not db.events(waiting)


def test_events_off_writes_none(db: Db, world: tuple[UUID, UUID], engine: Engine) -> None:
    organization, person = world
    call = send(db, "create", {"personUuid": str(person), "organizationUuid": str(organization)},
                events=False)["call"]["uuid"]  # fmt: skip
    for _ in range(3):
        send(db, "add_attempt", attempt(call), events=False)
    assert sweep(engine, events=False) == 1
    assert db.row(UUID(call))["status"] == "expired"
    assert db.events() == []


def test_a_batch_writes_the_events_of_the_commands_it_applied(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    organization, person = world
    taken = str(uuid4())
    create(db, world, uuid=taken)
    fresh = str(uuid4())
    base = {"personUuid": str(person), "organizationUuid": str(organization), "issuedAt": ISSUED}
    sent: list[tuple[str, CommandKind, dict[str, Any]]] = [
        ("b1", "create", {**base, "uuid": fresh}),
        ("b2", "add_attempt", {**attempt(fresh), "issuedAt": ISSUED}),
        ("b3", "create", {**base, "uuid": taken}),  # refused at commit: the batch is redone
        ("b4", "complete", {"callUuid": fresh, "userUuid": str(uuid4()), "result": "ok",
                            "issuedAt": ISSUED}),
        ("b5", "cancel", {"callUuid": fresh, "issuedAt": ISSUED}),  # ended: conflict
    ]
    entries = [BatchEntry(cid, parse_command(kind, payload)) for cid, kind, payload in sent]
    result = handle_batch(entries, lambda: SqlUnitOfWork(db.engine))
    assert result.redone > 0
    events = db.events(UUID(fresh))
    assert [e["kind"] for e in events] == ["call.created", "call.attempt_added", "call.completed"]
    outcomes = result.outcomes
    applied = [outcomes[i] for i in (0, 1, 3)]
    assert [e["call"] for e in events] == [o["call"] for o in applied if o is not None]
    assert [e["kind"] for e in db.events(UUID(taken))] == ["call.created"]


def test_the_relay_marks_what_it_published_and_only_that(lone_db: Db) -> None:
    db, engine = lone_db, lone_db.engine
    organization = db.organization(1)
    for _ in range(5):
        db.call(db.person(organization), organization, attempts=1)
    sweep(engine)
    published: list[dict[str, Any]] = []
    assert relay_batch(engine, 3, published.extend) == 3
    assert backlog(engine).unpublished == 2

    def broker_refuses(events: list[dict[str, Any]]) -> None:
        raise ConnectionError("broker away")

    with pytest.raises(ConnectionError):
        relay_batch(engine, 3, broker_refuses)
    assert backlog(engine).unpublished == 2  # nothing marked
    assert relay_batch(engine, 3, published.extend) == 2
    assert relay_batch(engine, 3, published.extend) == 0
    assert [e["sequence"] for e in published] == sorted(e["sequence"] for e in db.events())
    assert backlog(engine) == backlog(engine).__class__(0, 0.0)


def test_one_relay_at_a_time(lone_db: Db) -> None:
    db, engine = lone_db, lone_db.engine
    organization = db.organization(1)
    db.call(db.person(organization), organization, attempts=1)
    sweep(engine)
    inner: list[int | None] = []

    def publish_while_another_tries(events: list[dict[str, Any]]) -> None:
        inner.append(relay_batch(engine, 10, lambda e: None))

    assert relay_batch(engine, 10, publish_while_another_tries) == 1
    assert inner == [None]  # the second relay found the lock held and published nothing


def test_tail_and_prune(lone_db: Db) -> None:
    db, engine = lone_db, lone_db.engine
    organization = db.organization(1)
    calls = [db.call(db.person(organization), organization, attempts=1) for _ in range(4)]
    sweep(engine)
    assert [k.event["callUuid"] for k in tail(engine, call_uuid=calls[2])] == [str(calls[2])]
    everything = tail(engine, limit=3)
    assert len(everything) == 3
    assert everything[0].published_at is None
    first = tail(engine, limit=1)[0].event["sequence"]
    assert tail(engine, after=first) == []
    relay_batch(engine, 2, lambda events: None)
    set_events_retention(engine, timedelta(hours=1))
    assert prune_published(engine).deleted == 0
    # Moved into the past, where no hourly partition is: the default one holds them.
    db.sql("UPDATE worker_call_events SET recorded_at = now() - interval '30 hours',"
           " published_at = now() - interval '30 hours'"
           " WHERE published_at IS NOT NULL")  # fmt: skip
    assert prune_published(engine).deleted == 2
    assert backlog(engine).unpublished == 2
    assert len(db.events()) == 2


def test_every_kind_of_event_matches_the_committed_schema(
    db: Db, world: tuple[UUID, UUID], engine: Engine
) -> None:
    import json
    from pathlib import Path

    import jsonschema

    from calls_worker.domain.events import CallEventDocument

    schema = json.loads(
        (Path(__file__).parents[2] / "docs/schemas/call-event.schema.json").read_text()
    )
    first = create(db, world, notes="n", pledgeCaseUuid=None)["call"]["uuid"]
    send(db, "add_attempt", attempt(first))
    send(db, "complete", {"callUuid": first, "userUuid": str(uuid4()), "result": "reached"})
    second = create(db, world)["call"]["uuid"]
    send(db, "cancel", {"callUuid": second})
    third = create(db, world)["call"]["uuid"]
    send(db, "expire", {"callUuid": third})
    create(db, world, externalMetadata={"source": "crm", "n": [1]}, status="completed")
    organization = db.organization(1)
    db.call(db.person(organization), organization, attempts=1)
    sweep(engine)
    events = db.events()
    assert {e["kind"] for e in events} == set(EVENT_KINDS)
    for event in events:
        jsonschema.validate(event, schema, format_checker=jsonschema.FormatChecker())
        CallEventDocument.model_validate(event)
    broken = {**events[0], "kind": "call.renamed"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_lanes_share_the_calls_and_each_keeps_its_calls_order(lone_db: Db) -> None:
    """Two lanes: each round of lane n publishes the events of the calls lane_of gives it,
    in seq order; lane 0 and lane 1 publish at once (their own locks), while a second relay
    of the same lane finds it held."""
    db, engine = lone_db, lone_db.engine
    organization = db.organization(None)
    calls = []
    for _ in range(16):  # in one lane only: a chance of 2 in 65,536
        person = db.person(organization)
        created = db.send("create", {"personUuid": str(person),
                                     "organizationUuid": str(organization)})  # fmt: skip
        calls.append(created["call"]["uuid"])
    for call in calls * 2:  # attempts interleaved across the calls
        db.send("add_attempt", {"callUuid": call, "userUuid": str(uuid4()),
                                "attemptedAt": ISSUED})  # fmt: skip
    lanes = {call: lane_of(call, 2) for call in calls}
    assert set(lanes.values()) == {0, 1}, "both lanes have calls (uuids are random)"
    published: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    inner: list[int | None] = []

    def lane_zero(events: list[dict[str, Any]]) -> None:
        published[0].extend(events)
        # While lane 0's round holds its lock: lane 1 publishes, another lane 0 cannot.
        inner.append(relay_batch(engine, 100, published[1].extend, lane=1, lanes=2))
        inner.append(relay_batch(engine, 100, lambda e: None, lane=0, lanes=2))

    assert relay_batch(engine, 100, lane_zero, lane=0, lanes=2) == len(published[0])
    assert inner == [len(published[1]), None]
    assert len(published[0]) + len(published[1]) == 16 * 3
    for lane, events in published.items():
        assert {lanes[e["callUuid"]] for e in events} == {lane}
        sequences = [e["sequence"] for e in events]
        assert sequences == sorted(sequences)
    assert backlog(engine).unpublished == 0
