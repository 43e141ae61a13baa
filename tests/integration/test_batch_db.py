"""Group commit on the real database: a batch gives each command exactly the outcome it
would get one after the other, in one transaction unless a write is refused."""

from __future__ import annotations

import json
import random
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from sqlalchemy import select

from calls_worker.adapters.db.call_json import call_json_sql
from calls_worker.adapters.db.tables import calls
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import BatchEntry, BatchResult, handle, handle_batch
from tests.db_world import ISSUED, Db

Sent = tuple[str, CommandKind, dict[str, Any]]


@pytest.fixture
def world(db: Db) -> tuple[UUID, UUID]:
    organization = db.organization(3)
    return organization, db.person(organization)


def batch(db: Db, sent: list[Sent]) -> BatchResult:
    entries = [BatchEntry(cid, parse_command(kind, payload)) for cid, kind, payload in sent]
    return handle_batch(entries, lambda: SqlUnitOfWork(db.engine))


def one_by_one(db: Db, sent: list[Sent]) -> list[Outcome]:
    return [handle(cid, parse_command(kind, payload), SqlUnitOfWork(db.engine))
            for cid, kind, payload in sent]  # fmt: skip


def create(world: tuple[UUID, UUID], uuid: str, **fields: Any) -> dict[str, Any]:
    organization, person = world
    return {"uuid": uuid, "personUuid": str(person), "organizationUuid": str(organization),
            "issuedAt": ISSUED, **fields}  # fmt: skip


def attempt(call: str, at: str = ISSUED) -> dict[str, Any]:
    return {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": at, "issuedAt": ISSUED}


def on(call: str, **fields: Any) -> dict[str, Any]:
    return {"callUuid": call, "issuedAt": ISSUED, **fields}


def test_create_attempts_and_complete_of_one_call_in_one_transaction(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    call = str(uuid4())
    sent: list[Sent] = [
        ("c", "create", create(world, call)),
        ("a1", "add_attempt", attempt(call)),
        ("a2", "add_attempt", attempt(call, "2026-03-01T08:00:00+00:00")),
        ("done", "complete", on(call, userUuid=str(uuid4()), result="reached")),
    ]
    result = batch(db, sent)
    assert result.commits == 1
    assert result.redone == 0
    outcomes = result.outcomes
    assert all(o is not None and o["ok"] for o in outcomes), outcomes
    assert outcomes[2]["call"]["attemptCount"] == 2  # type: ignore[index]
    assert outcomes[3]["call"]["status"] == "completed"  # type: ignore[index]
    assert db.row(UUID(call))["attempt_count"] == 2
    kept = db.sql("SELECT count(*) FROM worker_processed_commands").scalar()
    assert kept == 4


def test_a_command_id_twice_in_a_batch_is_applied_once(db: Db, world: tuple[UUID, UUID]) -> None:
    call = str(uuid4())
    sent: list[Sent] = [
        ("c", "create", create(world, call)),
        ("a", "add_attempt", attempt(call)),
        ("a", "add_attempt", attempt(call)),  # redelivered within the batch
    ]
    result = batch(db, sent)
    assert result.outcomes[1] == result.outcomes[2]
    assert db.attempt_rows(UUID(call)) == 1
    # And a redelivery of the whole batch changes nothing and answers the same.
    again = batch(db, sent)
    assert again.outcomes == result.outcomes
    assert db.attempt_rows(UUID(call)) == 1


def test_a_broken_rule_between_good_commands_is_its_own_outcome(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    call, missing = str(uuid4()), str(uuid4())
    sent: list[Sent] = [
        ("c", "create", create(world, call)),
        ("x", "complete", on(missing, userUuid=str(uuid4()), result="reached")),
        ("a", "add_attempt", attempt(call)),
    ]
    result = batch(db, sent)
    assert result.commits == 1
    codes = [o["ok"] if o and o["ok"] else o and o["error"]["code"] for o in result.outcomes]
    assert codes == [True, "not_found", True]
    assert db.attempt_rows(UUID(call)) == 1


def test_a_unique_violation_between_good_commands_fails_none_of_them(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    taken, before, after = str(uuid4()), str(uuid4()), str(uuid4())
    one_by_one(db, [("first", "create", create(world, taken, notes="first"))])
    sent: list[Sent] = [
        ("b", "create", create(world, before)),
        ("dup", "create", create(world, taken, notes="second")),
        ("a", "create", create(world, after)),
        ("b-attempt", "add_attempt", attempt(before)),
    ]
    result = batch(db, sent)
    codes = [o["ok"] if o and o["ok"] else o and o["error"]["code"] for o in result.outcomes]
    assert codes == [True, "conflict", True, True]
    assert result.redone >= 1
    assert not result.failed
    assert db.row(UUID(taken))["notes"] == "first"
    assert db.attempt_rows(UUID(before)) == 1
    assert db.sql("SELECT count(*) FROM calls").scalar() == 3


def test_a_missing_row_and_a_refused_value_fail_only_their_command(
    db: Db, world: tuple[UUID, UUID]
) -> None:
    good = [str(uuid4()) for _ in range(3)]
    sent: list[Sent] = [
        ("g0", "create", create(world, good[0])),
        ("fk", "create", {**create(world, str(uuid4())), "personUuid": str(uuid4())}),
        ("g1", "create", create(world, good[1])),
        # Valid to the worker, refused by a rule of the API's own table (below).
        ("long", "create", create(world, str(uuid4()), notes="n" * 20)),
        ("g2", "create", create(world, good[2])),
    ]
    db.sql("ALTER TABLE calls ADD CONSTRAINT api_notes_short CHECK (length(notes) < 10)")
    try:
        result = batch(db, sent)
    finally:
        db.sql("ALTER TABLE calls DROP CONSTRAINT api_notes_short")
    assert [o is not None and o["ok"] for o in result.outcomes] == [True, False, True, False, True]
    assert result.outcomes[1]["error"]["code"] == "not_found"  # type: ignore[index]
    assert result.outcomes[3] is None
    assert isinstance(result.failed[3], psycopg.errors.CheckViolation)
    assert sorted(str(u) for u in db.sql("SELECT uuid FROM calls").scalars()) == sorted(good)
    ids = set(db.sql("SELECT command_id FROM worker_processed_commands").scalars())
    assert ids == {"g0", "fk", "g1", "g2"}


def _random_commands(rng: random.Random, world: tuple[UUID, UUID], prefix: str,
                     calls: list[str]) -> list[Sent]:  # fmt: skip
    """A stream over a few calls: creates (some of a taken uuid), attempts, completes,
    cancels, expires, a few redeliveries; any order, so many break a rule."""
    sent: list[Sent] = []
    for n in range(rng.randint(5, 40)):
        call = rng.choice(calls)
        roll = rng.random()
        if sent and roll < 0.08:
            sent.append(rng.choice(sent))  # a redelivery, maybe of a later outcome
            continue
        # Times unique to each attempt: two at the same time come back in their uuids'
        # order, which differs between the two runs.
        at = f"2026-03-01T0{rng.randint(0, 8)}:{n:02d}:00+00:00"
        kind: CommandKind
        if roll < 0.3:
            kind, payload = "create", create(world, call)
        elif roll < 0.75:
            kind, payload = "add_attempt", {**attempt(call, at), "userUuid": str(UUID(int=n))}
        elif roll < 0.85:
            kind, payload = "complete", on(call, userUuid=str(UUID(int=n)), result="reached")
        elif roll < 0.93:
            kind, payload = "cancel", on(call)
        else:
            kind, payload = "expire", on(call)
        sent.append((f"{prefix}{n}", kind, payload))
    return sent


@pytest.mark.parametrize("seed", range(12))
def test_a_batch_answers_as_the_commands_one_after_the_other(
    db: Db, world: tuple[UUID, UUID], seed: int
) -> None:
    """The same stream over two sets of calls: one by one, then as one batch. The outcomes
    are the same but for the calls' uuids, and so is what the database holds. Two of the
    three calls exist before the stream, with attempts (a batch reads them at its start)."""
    first = [str(uuid4()) for _ in range(3)]
    second = [str(uuid4()) for _ in range(3)]
    for n, call in enumerate([*first[:2], *second[:2]]):
        one_by_one(db, [(f"{seed}-pre-{n}", "create", create(world, call)),
                        (f"{seed}-pre-{n}-a", "add_attempt",
                         {**attempt(call, "2026-03-01T04:30:00+00:00"),
                          "userUuid": str(UUID(int=1000 + n % 2))})])  # fmt: skip
    stream = _random_commands(random.Random(seed), world, f"{seed}-", first)
    renamed = dict(zip(first, second, strict=True))

    def rename(value: Any) -> Any:
        text = json.dumps(value)
        for old, new in renamed.items():
            text = text.replace(old, new)
        return json.loads(text)

    alone = one_by_one(db, stream)
    together = batch(db, [(f"b{cid}", kind, rename(p)) for cid, kind, p in stream])
    assert not together.failed
    assert together.stopped_by is None
    assert together.outcomes == [rename(o) for o in alone]
    for old, new in renamed.items():
        assert db.attempt_rows(UUID(new)) == db.attempt_rows(UUID(old))


def _read(db: Db, call: str) -> Any:
    with db.engine.connect() as connection:
        return connection.execute(select(call_json_sql(calls)).where(
            calls.c.uuid == UUID(call))).scalar()


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("apply", [batch, one_by_one], ids=["batch", "one-by-one"])
def test_an_earlier_attempt_arriving_later_shows_where_a_read_shows_it(
    db: Db, world: tuple[UUID, UUID], apply: Any
) -> None:
    """An outcome's call, and its event's, list the attempts as a read of the call does: by
    attemptedAt, however the commands arrived (the soak found them in arrival order). So
    does a call managed externally, created with its attempts in any order."""
    call, external = str(uuid4()), str(uuid4())
    sent: list[Sent] = [
        ("c", "create", create(world, call)),
        ("late", "add_attempt", attempt(call, "2026-03-01T09:00:00+00:00")),
        ("early", "add_attempt", attempt(call, "2026-03-01T08:00:00+00:00")),
        ("x", "create", create(world, external, externalMetadata={},
                               attempts=[
            {"userUuid": str(uuid4()), "attemptedAt": "2026-03-01T10:00:00+00:00"},
            {"userUuid": str(uuid4()), "attemptedAt": "2026-03-01T07:00:00+00:00"}])),
    ]  # fmt: skip
    done = apply(db, sent)
    outcomes: list[Any] = done.outcomes if isinstance(done, BatchResult) else done
    assert all(o["ok"] for o in outcomes), outcomes
    for outcome, uuid, hours in ((outcomes[2], call, ["08", "09"]),
                                 (outcomes[3], external, ["07", "10"])):  # fmt: skip
        shown, stored = outcome["call"], _read(db, uuid)
        assert [a["attemptedAt"][11:13] for a in shown["attempts"]] == hours
        assert _same(shown, stored)
        last_event = db.sql("SELECT call FROM worker_call_events WHERE call_uuid = :u"
                            " ORDER BY seq DESC LIMIT 1", u=uuid).scalar()  # fmt: skip
        assert _same(last_event, stored)
