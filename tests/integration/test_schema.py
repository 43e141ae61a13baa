"""The schema as a contract with the API, which writes into these tables with plain SQL."""

from __future__ import annotations

from uuid import UUID

import pytest
from sqlalchemy.exc import IntegrityError

from tests.db_world import Db


@pytest.fixture
def call(db: Db) -> UUID:
    organization = db.organization(3)
    return db.call(db.person(organization), organization)


def test_a_plain_sql_attempt_is_counted(db: Db, call: UUID) -> None:
    assert db.row(call)["attempt_count"] == 0
    db.plain_attempt(call)
    db.plain_attempt(call)
    assert db.row(call)["attempt_count"] == db.attempt_rows(call) == 2


def test_deleting_and_moving_attempts_keeps_the_count(db: Db, call: UUID) -> None:
    organization = db.organization(3)
    other = db.call(db.person(organization), organization)
    for _ in range(3):
        db.plain_attempt(call)
    db.sql(
        "DELETE FROM call_attempts WHERE uuid = (SELECT uuid FROM call_attempts"
        " WHERE call_uuid = :c LIMIT 1)",
        c=call,
    )
    db.sql(
        "UPDATE call_attempts SET call_uuid = :o WHERE uuid = (SELECT uuid FROM call_attempts"
        " WHERE call_uuid = :c LIMIT 1)",
        o=other,
        c=call,
    )
    assert (db.row(call)["attempt_count"], db.row(other)["attempt_count"]) == (1, 1)
    db.sql("TRUNCATE call_attempts")
    assert (db.row(call)["attempt_count"], db.row(other)["attempt_count"]) == (0, 0)


def test_attempt_count_cannot_be_set_by_hand(db: Db, call: UUID) -> None:
    db.plain_attempt(call)
    db.sql("UPDATE calls SET attempt_count = 99, notes = 'n' WHERE uuid = :c", c=call)
    row = db.row(call)
    assert (row["attempt_count"], row["notes"]) == (1, "n")


def test_a_new_call_starts_at_zero_attempts(db: Db) -> None:
    organization = db.organization(3)
    person = db.person(organization)
    db.sql(
        "INSERT INTO calls (uuid, person_uuid, organization_uuid, attempt_count)"
        " VALUES ('00000000-0000-4000-8000-000000000001', :p, :o, 7)",
        p=person,
        o=organization,
    )
    row = db.row(UUID("00000000-0000-4000-8000-000000000001"))
    assert (row["attempt_count"], row["status"], row["type"]) == (0, "requested", "verification")
    assert row["created_at"].utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    ("column", "value"), [("status", "lost"), ("type", "robocall"), ("external_metadata", "[]")]
)
def test_whitelists_are_enforced(db: Db, call: UUID, column: str, value: str) -> None:
    with pytest.raises(IntegrityError):
        db.sql(f"UPDATE calls SET {column} = :v WHERE uuid = :c", v=value, c=call)


@pytest.mark.parametrize("maximum", [0, -1])
def test_a_maximum_is_positive_or_null(db: Db, maximum: int) -> None:
    with pytest.raises(IntegrityError):
        db.organization(maximum)
    db.organization(None)
