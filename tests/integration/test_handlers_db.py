"""The handlers on the real database: what the fakes cannot show."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from tests.db_world import ISSUED, Db


@pytest.fixture
def world(db: Db) -> tuple[UUID, UUID]:
    organization = db.organization(3)
    return organization, db.person(organization)


def create(db: Db, world: tuple[UUID, UUID], command_id: str | None = None, **fields: object):  # type: ignore[no-untyped-def]
    organization, person = world
    payload = {"personUuid": str(person), "organizationUuid": str(organization), **fields}
    return db.send("create", {"issuedAt": ISSUED, **payload}, command_id)


def test_create_then_attempts_mix_with_the_apis(db: Db, world: tuple[UUID, UUID]) -> None:
    call = create(db, world)["call"]["uuid"]
    db.plain_attempt(UUID(call))  # the API's own attempt
    outcome = db.send(
        "add_attempt",
        {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED, "issuedAt": ISSUED},
    )
    assert outcome["call"]["attemptCount"] == 2
    assert len(outcome["call"]["attempts"]) == 2
    assert db.row(UUID(call))["attempt_count"] == 2
    assert db.row(UUID(call))["updated_at"].isoformat() == ISSUED


def test_managed_call_is_stored_with_sql_null_metadata(db: Db, world: tuple[UUID, UUID]) -> None:
    call = UUID(create(db, world)["call"]["uuid"])
    assert db.sql("SELECT external_metadata IS NULL FROM calls WHERE uuid = :u", u=call).scalar()


def test_external_call_with_attempts_counts_them(db: Db, world: tuple[UUID, UUID]) -> None:
    attempts = [{"userUuid": str(uuid4()), "attemptedAt": ISSUED} for _ in range(4)]
    outcome = create(
        db, world, externalMetadata={"source": "crm"}, status="cancelled", attempts=attempts
    )
    call = UUID(outcome["call"]["uuid"])
    assert outcome["call"]["attemptCount"] == 4
    assert db.row(call)["attempt_count"] == db.attempt_rows(call) == 4
    assert db.row(call)["status"] == "cancelled"


def test_redelivery_returns_the_stored_outcome_unchanged(db: Db, world: tuple[UUID, UUID]) -> None:
    first = create(db, world, command_id="create-1", notes="é ✓", externalMetadata={"n": [1, 2]})
    again = create(db, world, command_id="create-1", notes="é ✓", externalMetadata={"n": [1, 2]})
    assert first == again
    assert db.sql("SELECT count(*) FROM calls").scalar() == 1
    assert db.sql("SELECT count(*) FROM worker_processed_commands").scalar() == 1


def test_conflicting_create_leaves_the_call_alone(db: Db, world: tuple[UUID, UUID]) -> None:
    uuid = str(uuid4())
    create(db, world, uuid=uuid, notes="first")
    outcome = create(db, world, uuid=uuid, notes="second")
    assert outcome["error"]["code"] == "conflict"
    assert db.row(UUID(uuid))["notes"] == "first"


def test_failed_command_writes_nothing_but_its_outcome(db: Db, world: tuple[UUID, UUID]) -> None:
    organization, _ = world
    other_case = db.pledge_case(db.person(organization))
    outcome = create(db, world, pledgeCaseUuid=str(other_case), command_id="bad")
    assert outcome["error"]["code"] == "invalid"
    assert db.sql("SELECT count(*) FROM calls").scalar() == 0
    assert (
        db.sql("SELECT outcome FROM worker_processed_commands WHERE command_id = 'bad'").scalar()
        == outcome
    )


def test_complete_on_the_database(db: Db, world: tuple[UUID, UUID]) -> None:
    call = create(db, world)["call"]["uuid"]
    user = uuid4()
    outcome = db.send(
        "complete", {"callUuid": call, "userUuid": str(user), "result": "ok", "issuedAt": ISSUED}
    )
    row = db.row(UUID(call))
    assert (row["status"], row["result"], row["completed_by"]) == ("completed", "ok", user)
    assert outcome["call"]["completedAt"] == row["completed_at"].isoformat() == ISSUED
    again = db.send("cancel", {"callUuid": call})
    assert again["error"]["code"] == "conflict"


# Values reach the database bound into the statements' text by psycopg (simple query
# protocol): quotes, backslashes, placeholders and statement separators must stay data.
AWKWARD_TEXT = [
    'O\'Brien said "hi"',
    "back\\slash \\' and \\\\",
    "%s %(uuid)s %% {}",
    "'); DROP TABLE calls; --",
    "$$ $tag$ E'\\n' ;COMMIT; ROLLBACK",
    "é ✓ 😀 \t tab",
]


@pytest.mark.parametrize("text", AWKWARD_TEXT)
def test_awkward_text_is_stored_as_given(db: Db, world: tuple[UUID, UUID], text: str) -> None:
    external = create(db, world, notes=text, externalMetadata={text: [text]})["call"]["uuid"]
    managed = create(db, world, notes=text)["call"]["uuid"]
    completed = db.send("complete", {"callUuid": managed, "userUuid": str(uuid4()), "result": text})
    assert completed["call"]["result"] == completed["call"]["notes"] == text
    assert db.row(UUID(external))["external_metadata"] == {text: [text]}
    assert (db.row(UUID(managed))["notes"], db.row(UUID(managed))["result"]) == (text, text)
    assert db.sql("SELECT count(*) FROM calls").scalar() == 2


@pytest.mark.parametrize(
    "missing",
    [["personUuid"], ["organizationUuid"], ["pledgeCaseUuid"], ["personUuid", "organizationUuid"]],
)
@pytest.mark.parametrize("external", [False, True])
def test_missing_rows_are_found_at_commit_and_all_named(
    db: Db, world: tuple[UUID, UUID], missing: list[str], external: bool
) -> None:
    """Creates read nothing first: the foreign keys find a missing row, then the error
    names every missing one, and only the error outcome is kept."""
    organization, person = world
    fields: dict[str, object] = {"pledgeCaseUuid": str(db.pledge_case(person))}
    fields |= {name: str(uuid4()) for name in missing}
    if external:
        fields["externalMetadata"] = {"source": "crm"}
    outcome = db.send(
        "create",
        {"issuedAt": ISSUED, "personUuid": str(person),
         "organizationUuid": str(organization), **fields},
        "missing-refs",
    )  # fmt: skip
    assert (outcome["ok"], outcome["error"]["code"]) == (False, "not_found")
    assert [d["field"] for d in outcome["error"]["details"]] == missing
    assert db.sql("SELECT count(*) FROM calls").scalar() == 0
    recorded = "SELECT outcome FROM worker_processed_commands WHERE command_id = 'missing-refs'"
    assert db.sql(recorded).scalar() == outcome
