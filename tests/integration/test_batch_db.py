"""Group commit on the real database: a batch gives each command exactly the outcome it
would get one after the other, in one transaction unless a write is refused."""

from __future__ import annotations

import json
import random
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from calls_worker.adapters.db.repository import SqlUnitOfWork
from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.batch import BatchEntry, BatchResult, handle_batch
from calls_worker.service.handlers import handle
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
