"""The table of access cases (tests/access_cases.py) on real PostgreSQL, the sender kept
with each outcome, and the reach record that service accounts' listings read."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest

from calls_worker.adapters.db.directory import add_service_account, disable_service_account
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.access import AccessPolicy
from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import handle
from tests.access_cases import ACCESS_CASES, AccessCase, World, check, run, same_as_missing
from tests.db_world import Db
from tests.worker_path import Bound, send


class DbWorld(World):
    def __init__(self, db: Db) -> None:
        self.db = db

    def organization(self) -> UUID:
        return self.db.organization(3)

    def person(self, owner: UUID) -> UUID:
        return self.db.person(owner)

    def call(self, person: UUID, performer: UUID, *, completed: bool) -> UUID:
        return self.db.call(person, performer, status="completed" if completed else "requested")

    def account(
        self, organization: UUID, scopes: list[str], *, disabled: bool, certificate: str | None
    ) -> UUID:
        uuid = add_service_account(self.db.engine, "test", organization, scopes, certificate)
        if disabled:
            disable_service_account(self.db.engine, uuid)
        return uuid

    def handle(
        self, kind: CommandKind, command: dict[str, Any], *, policy: AccessPolicy,
        signer: str | None, bound: Bound = "own",
    ) -> Outcome:  # fmt: skip
        applied = send(lambda: SqlUnitOfWork(self.db.engine), kind, command, policy=policy,
                       signer=signer, bound=bound)  # fmt: skip
        assert applied.outcome is not None
        return applied.outcome


@pytest.mark.parametrize("case", ACCESS_CASES, ids=lambda case: case.name)
def test_access_case(db: Db, case: AccessCase) -> None:
    outcome, _ = run(DbWorld(db), case)
    check(case, outcome)


@pytest.mark.parametrize(
    "case",
    [c for c in ACCESS_CASES if c.target in ("pB", "B_for_B") and c.expected == "not_found"],
    ids=lambda case: case.name,
)
def test_out_of_reach_answers_as_missing(db: Db, case: AccessCase) -> None:
    same_as_missing(DbWorld(db), case)


def test_the_processed_record_keeps_the_sender(db: Db) -> None:
    world = DbWorld(db)
    org = world.organization()
    account = world.account(org, ["calls:create"], disabled=False, certificate=None)
    person = world.person(org)
    command = parse_command("create", {"personUuid": str(person), "organizationUuid": str(org),
                                       "serviceAccountUuid": str(account)})  # fmt: skip
    command_id = str(uuid4())
    assert handle(command_id, command, SqlUnitOfWork(db.engine))["ok"]
    kept = db.sql("SELECT service_account_uuid FROM worker_processed_commands"
                  " WHERE command_id = :c", c=command_id).scalar_one()  # fmt: skip
    assert kept == account


def _reach(db: Db, call: UUID) -> set[UUID]:
    rows = db.sql("SELECT organization_uuid FROM worker_call_reach WHERE call_uuid = :c", c=call)
    return set(rows.scalars())


def _expected_reach(db: Db) -> set[tuple[UUID, UUID]]:
    rows = db.sql(
        "SELECT c.organization_uuid, c.uuid FROM calls c UNION"
        " SELECT p.owning_organization_uuid, c.uuid FROM calls c"
        " JOIN persons p ON p.uuid = c.person_uuid"
    )
    return {(row[0], row[1]) for row in rows}


def _actual_reach(db: Db) -> set[tuple[UUID, UUID]]:
    rows = db.sql(
        "SELECT r.organization_uuid, r.call_uuid FROM worker_call_reach r"
        " JOIN calls c ON c.uuid = r.call_uuid AND c.created_at = r.created_at"
    )
    actual = {(row[0], row[1]) for row in rows}
    total = db.sql("SELECT count(*) FROM worker_call_reach").scalar_one()
    assert total == len(actual), "rows whose creation time is not their call's"
    return actual


def test_the_reach_record_follows_every_change(db: Db) -> None:
    """Insert, move to another person, organization or time, a person moving to another
    owner, delete: the record always equals what the rule says."""
    a, b, c = db.organization(), db.organization(), db.organization()
    pa, pb = db.person(a), db.person(b)
    same = db.call(pa, a)  # performer and owner the same: one row
    other = db.call(pa, b)
    assert _reach(db, same) == {a}
    assert _reach(db, other) == {a, b}
    assert _actual_reach(db) == _expected_reach(db)
    db.sql("UPDATE calls SET person_uuid = :p WHERE uuid = :c", p=pb, c=other)
    assert _reach(db, other) == {b}
    db.sql("UPDATE calls SET organization_uuid = :o WHERE uuid = :c", o=c, c=same)
    assert _reach(db, same) == {a, c}
    db.sql("UPDATE calls SET created_at = created_at - interval '1 day' WHERE uuid = :c", c=same)
    assert _actual_reach(db) == _expected_reach(db)
    db.sql("UPDATE persons SET owning_organization_uuid = :o WHERE uuid = :p", o=c, p=pa)
    assert _reach(db, same) == {c}
    assert _actual_reach(db) == _expected_reach(db)
    db.sql("DELETE FROM calls WHERE uuid = :c", c=same)
    assert _reach(db, same) == set()
    assert _actual_reach(db) == _expected_reach(db)
