"""Edges of the command rules, through the session's real worker: far-future timestamps on
either side of the tolerance, NUL in a result, end states of external calls, fields given
as null, requestedBy, and a command given up after its retries."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis
from celery import Celery

from calls_worker.client import CallsClient, CommandFailed
from calls_worker.domain.commands import FUTURE_TOLERANCE, CommandKind
from calls_worker.domain.errors import InvalidCommand
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import Process, redis_database, wait_for_worker, worker_env

# Each test on the session's worker runs on Redis and on RabbitMQ (tests/e2e/conftest.py).
pytestmark = pytest.mark.brokers("redis", "rabbitmq")

TIMEOUT = 60
MARGIN = timedelta(minutes=5)  # the producer's and the worker's clocks differ by this at most


def _person(db: Db) -> dict[str, str]:
    organization = db.organization(3)
    return {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}


def _stamp(offset: timedelta) -> str:
    return (datetime.now(UTC) + offset).isoformat()


# (kind, field, command builder given a call and a person, for a timestamp ``at``)
FUTURE_FIELDS: list[tuple[CommandKind, str, Any]] = [
    ("create", "issuedAt", lambda call, person, at: {**person, "issuedAt": at}),
    ("create", "createdAt", lambda call, person, at: {**person, "createdAt": at}),
    ("create", "completedAt", lambda call, person, at: {
        **person, "externalMetadata": {}, "status": "completed", "completedAt": at}),
    ("create", "cancelledAt", lambda call, person, at: {
        **person, "externalMetadata": {}, "status": "cancelled", "cancelledAt": at}),
    ("cancel", "cancelledAt", lambda call, person, at: {"callUuid": call, "cancelledAt": at}),
    ("expire", "expiredAt", lambda call, person, at: {"callUuid": call, "expiredAt": at}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "field", "build"), FUTURE_FIELDS,
                         ids=[f"{k}.{f}" for k, f, _ in FUTURE_FIELDS])  # fmt: skip
def test_a_timestamp_past_the_tolerance_is_refused_and_one_within_it_taken(
    db: Db, client: CallsClient, worker: Process, kind: CommandKind, field: str, build: Any
) -> None:
    person = _person(db)
    outcomes = {}
    sides = {"within": FUTURE_TOLERANCE - MARGIN, "past": FUTURE_TOLERANCE + MARGIN}
    for name, offset in sides.items():
        call = client.send("create", person).outcome(TIMEOUT)["call"]["uuid"]
        command = build(call, person, _stamp(offset))
        outcomes[name] = client.send(kind, command).outcome(TIMEOUT)
    assert outcomes["within"]["ok"], outcomes["within"]
    refused = outcomes["past"]
    assert refused["error"]["code"] == "invalid"
    assert [d["field"] for d in refused["error"]["details"]] == [field]
    assert "in the future" in refused["error"]["details"][0]["reason"]


def test_nul_in_a_result_is_refused_naming_it_and_kept_as_sent(
    db: Db, client: CallsClient, worker: Process
) -> None:
    person = _person(db)
    external = {**person, "externalMetadata": {}, "status": "completed", "result": "a\x00b"}
    unchecked = client.send_unchecked("create", json.dumps(external))
    outcome = unchecked.outcome(TIMEOUT)
    assert outcome["error"]["code"] == "invalid"
    assert [d["field"] for d in outcome["error"]["details"]] == ["result"]
    kept = db.sql("SELECT raw_body, details FROM worker_rejected_commands WHERE command_id = :c",
                  c=unchecked.command_id).one()  # fmt: skip
    assert json.loads(kept.raw_body)[1]["command"] == json.dumps(external)  # as sent
    assert [d["field"] for d in kept.details] == ["result"]


@pytest.mark.parametrize("status", ["completed", "cancelled", "expired"])
def test_commands_on_an_external_call_in_an_end_state_conflict(
    db: Db, client: CallsClient, worker: Process, status: str
) -> None:
    created = client.send("create", {**_person(db), "externalMetadata": {"crm": 1},
                                     "status": status}).outcome(TIMEOUT)  # fmt: skip
    call = created["call"]["uuid"]
    commands: dict[CommandKind, dict[str, Any]] = {
        "add_attempt": {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED},
        "complete": {"callUuid": call, "userUuid": str(uuid4()), "result": "r"},
        "cancel": {"callUuid": call},
        "expire": {"callUuid": call},
    }
    for kind, command in commands.items():
        outcome = client.send(kind, command).outcome(TIMEOUT)
        assert outcome["error"]["code"] == "conflict", (kind, outcome)
        assert "external" in outcome["error"]["message"]
    assert db.row(UUID(call))["status"] == status


def test_fields_given_as_null_and_requested_by(
    db: Db, client: CallsClient, worker: Process
) -> None:
    person = _person(db)
    requester = str(uuid4())
    external = client.send("create", {**person, "externalMetadata": {}, "status": None,
                                      "requestedBy": requester}).outcome(TIMEOUT)  # fmt: skip
    managed = client.send("create", {**person, "type": None}).outcome(TIMEOUT)
    with_status = {**person, "type": None, "status": None}
    with pytest.raises(InvalidCommand):
        client.send("create", with_status)  # the client refuses it before sending...
    managed_typed = client.send_unchecked("create", json.dumps(with_status)).outcome(TIMEOUT)
    assert external["call"]["status"] == "requested"  # status null: as if not given
    assert external["call"]["requestedBy"] == requester
    assert db.row(UUID(external["call"]["uuid"]))["requested_by"] == UUID(requester)
    assert managed["call"]["type"] == "verification"  # type null: the default
    # ... and the worker too: status is forbidden on a call managed here, even as null.
    assert managed_typed["error"]["code"] == "invalid"
    assert [d["field"] for d in managed_typed["error"]["details"]] == ["status"]


@pytest.mark.slow
def test_a_command_failing_through_its_retries_is_given_up_and_kept(
    db: Db, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A database that answers, but fails this command every time (a serialization failure,
    raised by a trigger for one user): after COMMAND_MAX_RETRIES retries the command is kept
    among the rejected ones with the reason, its task fails, and nothing was applied."""
    doomed = uuid4()
    db.sql(f"""
        CREATE FUNCTION test_always_fails() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.user_uuid = '{doomed}' THEN
                RAISE EXCEPTION 'the test fails this attempt' USING ERRCODE = '40001';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_always_fails BEFORE INSERT ON call_attempts
            FOR EACH ROW EXECUTE FUNCTION test_always_fails();
    """)
    broker = redis_database(redis_url, 15)
    redis.Redis.from_url(broker).flushdb()
    control = Celery("retries-control", set_as_current=False)
    control.conf.update({"broker_url": broker, "result_backend": broker})
    worker = Process(["worker", "-c", "1", "-n", "retries@%h", "-Q", "calls.commands"],
                     worker_env(database_url, broker, tmp_path,
                                CALLS_WORKER_COMMAND_MAX_RETRIES="2",
                                CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="1"),
                     tmp_path / "retries.log")  # fmt: skip
    try:
        wait_for_worker(control, "retries", worker)
        with CallsClient(broker) as client:
            call = client.send("create", _person(db)).outcome(TIMEOUT)["call"]["uuid"]
            handle = client.send("add_attempt", {"callUuid": call, "userUuid": str(doomed),
                                                 "attemptedAt": ISSUED})  # fmt: skip
            with pytest.raises(CommandFailed):
                handle.outcome(TIMEOUT)
    finally:
        worker.stop()
        control.close()
        db.sql("DROP TRIGGER test_always_fails ON call_attempts;"
               " DROP FUNCTION test_always_fails()")  # fmt: skip
    reason = db.sql("SELECT reason FROM worker_rejected_commands WHERE command_id = :c",
                    c=handle.command_id).scalar_one()  # fmt: skip
    assert "failed after 2 retries" in reason
    assert "SerializationFailure" in reason or "40001" in reason
    assert worker.output().count("will be retried") == 2
    assert db.attempt_rows(UUID(call)) == 0
