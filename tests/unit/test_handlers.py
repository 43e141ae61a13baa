from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from freezegun import freeze_time

from calls_worker.domain.commands import FUTURE_TOLERANCE, CommandKind, parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import handle
from tests.reliability import Reliability, counted
from tests.unit.fakes import FakeState, FakeUnitOfWork

ISSUED = "2026-03-01T09:00:00+00:00"


class World:
    """A fake database with one organization (max 3), one person and a pledge case."""

    def __init__(self) -> None:
        self.uow = FakeUnitOfWork()
        state = self.uow.committed
        self.organization = state.add_organization(3)
        self.person = state.add_person(self.organization)
        self.pledge_case = state.add_pledge_case(self.person)
        self.other_pledge_case = state.add_pledge_case(state.add_person(self.organization))

    @property
    def state(self) -> FakeState:
        return self.uow.committed

    def send(
        self, kind: CommandKind, payload: dict[str, Any], command_id: str | None = None
    ) -> Outcome:
        command = parse_command(kind, payload)
        return handle(command_id or str(uuid4()), command, self.uow)

    def create(self, **fields: Any) -> Outcome:
        payload = {
            "personUuid": str(self.person),
            "organizationUuid": str(self.organization),
            "issuedAt": ISSUED,
            **fields,
        }
        return self.send("create", payload)

    def new_call(self) -> str:
        outcome = self.create()
        assert outcome["ok"], outcome
        return str(outcome["call"]["uuid"])

    def attempt(self, call: str, command_id: str | None = None) -> Outcome:
        payload = {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED}
        return self.send("add_attempt", payload, command_id)


@pytest.fixture
def world() -> World:
    return World()


def error_of(outcome: Outcome) -> tuple[str, int]:
    assert outcome["ok"] is False, outcome
    return outcome["error"]["code"], outcome["error"]["status"]


def test_create_managed_call(world: World) -> None:
    call_uuid = uuid4()
    outcome = world.create(uuid=str(call_uuid), type="happy_call", notes="first try")
    assert outcome["ok"] is True
    call = outcome["call"]
    assert call["uuid"] == str(call_uuid)
    assert (call["status"], call["type"], call["notes"]) == ("requested", "happy_call", "first try")
    assert (call["attempts"], call["attemptCount"]) == ([], 0)
    assert call["createdAt"] == call["updatedAt"] == ISSUED
    assert call["externalMetadata"] is None
    assert call_uuid in world.state.calls


def test_create_defaults_type_to_verification_and_makes_a_uuid(world: World) -> None:
    call = world.create()["call"]
    assert call["type"] == "verification"
    assert UUID(call["uuid"]).version == 4


def test_timestamps_default_to_the_clock_without_issued_at(world: World) -> None:
    with freeze_time("2026-05-05 12:00:00"):
        outcome = world.send(
            "create", {"personUuid": str(world.person), "organizationUuid": str(world.organization)}
        )
    assert outcome["call"]["createdAt"] == "2026-05-05T12:00:00+00:00"


def test_create_external_call_as_given(world: World) -> None:
    user = str(uuid4())
    outcome = world.create(
        externalMetadata={"source": "crm", "id": 7},
        status="completed",
        result="reached",
        completedAt="2026-02-01T10:00:00+01:00",
        attempts=[{"userUuid": user, "attemptedAt": "2026-02-01T09:00:00Z"}],
        pledgeCaseUuid=str(world.other_pledge_case),  # domain rules are not applied
    )
    call = outcome["call"]
    assert (call["status"], call["type"], call["result"]) == (
        "completed",
        "verification",
        "reached",
    )
    assert call["completedAt"] == "2026-02-01T09:00:00+00:00"
    assert call["attempts"] == [{"userUuid": user, "attemptedAt": "2026-02-01T09:00:00+00:00"}]
    assert call["attemptCount"] == 1
    assert call["externalMetadata"] == {"source": "crm", "id": 7}


@pytest.mark.parametrize("missing", ["personUuid", "organizationUuid", "pledgeCaseUuid"])
def test_create_needs_existing_references(world: World, missing: str) -> None:
    fields = {"pledgeCaseUuid": str(world.pledge_case), missing: str(uuid4())}
    outcome = world.create(**fields)
    assert error_of(outcome) == ("not_found", 404)
    assert [d["field"] for d in outcome["error"]["details"]] == [missing]
    assert world.state.calls == {}


def test_pledge_case_must_belong_to_the_person(world: World) -> None:
    outcome = world.create(pledgeCaseUuid=str(world.other_pledge_case))
    assert error_of(outcome) == ("invalid", 422)
    assert outcome["error"]["details"][0]["field"] == "pledgeCaseUuid"
    assert world.create(pledgeCaseUuid=str(world.pledge_case))["ok"] is True


def test_another_command_creating_the_same_uuid_conflicts(world: World) -> None:
    call_uuid = str(uuid4())
    assert world.create(uuid=call_uuid)["ok"] is True
    outcome = world.create(uuid=call_uuid, notes="again")
    assert error_of(outcome) == ("conflict", 409)
    assert world.state.calls[UUID(call_uuid)].notes is None


def test_the_same_command_twice_has_one_effect_and_the_first_outcome(world: World) -> None:
    call = world.new_call()
    first = world.attempt(call, command_id="cmd-1")
    second = world.attempt(call, command_id="cmd-1")
    assert first == second
    assert world.state.calls[UUID(call)].attempt_count == 1


def test_an_error_outcome_is_recorded_too(world: World) -> None:
    call = str(uuid4())
    first = world.attempt(call, command_id="cmd-early")
    assert error_of(first) == ("not_found", 404)
    world.create(uuid=call)
    assert world.attempt(call, command_id="cmd-early") == first
    assert world.state.calls[UUID(call)].attempt_count == 0


def test_add_attempts(world: World) -> None:
    call = world.new_call()
    for count in (1, 2, 3, 4):
        outcome = world.attempt(call)
        assert outcome["call"]["attemptCount"] == count
        assert len(outcome["call"]["attempts"]) == count
    assert outcome["call"]["status"] == "requested"  # the sweep expires, not the attempt


@pytest.mark.parametrize(
    ("kind", "extra", "field", "expected"),
    [
        ("complete", {"userUuid": str(uuid4()), "result": "pledged"}, "completedAt", ISSUED),
        ("cancel", {}, "cancelledAt", ISSUED),
        (
            "cancel",
            {"cancelledAt": "2026-02-02T00:00:00Z"},
            "cancelledAt",
            "2026-02-02T00:00:00+00:00",
        ),
        ("expire", {}, "expiredAt", ISSUED),
        ("expire", {"expiredAt": "2026-02-03T00:00:00Z"}, "expiredAt", "2026-02-03T00:00:00+00:00"),
    ],
)
def test_end_a_call(
    world: World, kind: CommandKind, extra: dict[str, Any], field: str, expected: str
) -> None:
    call = world.new_call()
    outcome = world.send(kind, {"callUuid": call, "issuedAt": ISSUED, **extra})
    assert outcome["ok"] is True, outcome
    assert outcome["call"]["status"] == {"complete": "completed", "cancel": "cancelled"}.get(
        kind, "expired"
    )
    assert outcome["call"][field] == expected
    assert outcome["call"]["updatedAt"] == ISSUED


def test_complete_stores_the_result(world: World) -> None:
    call = world.new_call()
    outcome = world.send("complete", {"callUuid": call, "userUuid": str(uuid4()), "result": "yes"})
    assert outcome["call"]["result"] == "yes"


COMMANDS_ON_A_CALL: list[tuple[CommandKind, dict[str, Any]]] = [
    ("add_attempt", {"userUuid": str(uuid4()), "attemptedAt": ISSUED}),
    ("complete", {"userUuid": str(uuid4()), "result": "late"}),
    ("cancel", {}),
    ("expire", {}),
]


@pytest.mark.parametrize(("kind", "extra"), COMMANDS_ON_A_CALL)
def test_commands_on_a_missing_call_are_not_found(
    world: World, kind: CommandKind, extra: dict[str, Any]
) -> None:
    outcome = world.send(kind, {"callUuid": str(uuid4()), **extra})
    assert error_of(outcome) == ("not_found", 404)
    assert outcome["error"]["details"] == [{"field": "callUuid", "reason": "does not exist"}]


@pytest.mark.parametrize(("kind", "extra"), COMMANDS_ON_A_CALL)
@pytest.mark.parametrize("ended_by", ["complete", "cancel", "expire"])
def test_commands_on_an_ended_call_conflict(
    world: World, kind: CommandKind, extra: dict[str, Any], ended_by: CommandKind
) -> None:
    call = world.new_call()
    end = {"userUuid": str(uuid4()), "result": "done"} if ended_by == "complete" else {}
    ended = world.send(ended_by, {"callUuid": call, **end})["call"]
    outcome = world.send(kind, {"callUuid": call, **extra})
    assert error_of(outcome) == ("conflict", 409)
    assert "an end state" in outcome["error"]["message"]
    assert world.send("expire", {"callUuid": call})["error"]["code"] == "conflict"
    assert world.state.calls[UUID(call)].status.value == ended["status"]
    assert world.state.calls[UUID(call)].attempt_count == 0


@pytest.mark.parametrize(("kind", "extra"), COMMANDS_ON_A_CALL)
def test_commands_on_an_external_call_conflict(
    world: World, kind: CommandKind, extra: dict[str, Any]
) -> None:
    call = world.create(externalMetadata={"source": "crm"})["call"]["uuid"]
    outcome = world.send(kind, {"callUuid": call, **extra})
    assert error_of(outcome) == ("conflict", 409)
    assert "external system" in outcome["error"]["message"]
    assert world.state.calls[UUID(call)].status.value == "requested"


def test_error_outcome_shape(world: World) -> None:
    outcome = world.send("cancel", {"callUuid": str(uuid4())})
    assert set(outcome) == {"ok", "error"}
    assert set(outcome["error"]) == {"code", "status", "message", "details"}


def test_success_outcome_has_every_api_field(world: World) -> None:
    call = world.create()["call"]
    assert set(call) == {
        "uuid", "status", "type", "attempts", "attemptCount", "result", "notes",
        "requestedBy", "personUuid", "pledgeCaseUuid", "organizationUuid", "externalMetadata",
        "createdAt", "updatedAt", "completedAt", "cancelledAt", "expiredAt",
    }  # fmt: skip


def test_nothing_is_committed_twice_for_a_redelivery(world: World) -> None:
    call = world.new_call()
    world.attempt(call, command_id="same")
    commits = world.uow.commits
    world.attempt(call, command_id="same")
    assert world.uow.commits == commits


def test_created_at_can_be_given(world: World) -> None:
    call = world.create(createdAt="2025-12-24T18:00:00-05:00")["call"]
    assert call["createdAt"] == "2025-12-24T23:00:00+00:00"
    assert datetime.fromisoformat(call["createdAt"]).tzinfo == UTC


@pytest.mark.scenario("clock-skew")
def test_an_absurd_future_timestamp_is_refused_and_skew_is_not(
    world: World, reliability: Reliability
) -> None:
    call = world.new_call()
    with freeze_time("2026-03-01 09:00:00"):
        far = world.send("add_attempt", {"callUuid": call, "userUuid": str(uuid4()),
                                         "attemptedAt": "2027-03-01T09:00:00Z"})  # fmt: skip
        skewed = world.send("add_attempt", {"callUuid": call, "userUuid": str(uuid4()),
                                            "attemptedAt": "2026-03-01T11:00:00Z",
                                            "issuedAt": "2026-03-01T11:00:00Z"})  # fmt: skip
    attempts = world.state.calls[UUID(call)].attempt_count
    reliability.record("clock-skew", commands=2, **dict(zip(("lost", "doubled"),
                       counted([attempts], 1), strict=True)))  # fmt: skip
    assert error_of(far) == ("invalid", 422)
    assert far["error"]["details"][0]["field"] == "attemptedAt"
    assert skewed["ok"] is True  # two hours ahead: a producer's clock, accepted
    assert skewed["call"]["updatedAt"] == "2026-03-01T11:00:00+00:00"  # the data decides


def test_absurd_timestamps_inside_attempts_are_named(world: World) -> None:
    with freeze_time("2026-03-01 09:00:00"):
        outcome = world.create(externalMetadata={}, attempts=[
            {"userUuid": str(uuid4()), "attemptedAt": "2026-02-01T09:00:00Z"},
            {"userUuid": str(uuid4()), "attemptedAt": "3026-02-01T09:00:00Z"},
        ])  # fmt: skip
    assert [d["field"] for d in outcome["error"]["details"]] == ["attempts.1.attemptedAt"]


@pytest.mark.parametrize("field", ["issuedAt", "createdAt", "completedAt", "cancelledAt"])
def test_the_future_tolerance_holds_to_the_microsecond(world: World, field: str) -> None:
    """A create's timestamp exactly FUTURE_TOLERANCE ahead of the worker's clock is taken;
    a microsecond later it is refused, naming the field."""
    now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    status = {"completedAt": "completed", "cancelledAt": "cancelled"}.get(field)
    extra: dict[str, Any] = {"externalMetadata": {}, "status": status} if status else {}
    outcomes = {}
    over = FUTURE_TOLERANCE + timedelta(microseconds=1)
    for name, ahead in (("at", FUTURE_TOLERANCE), ("over", over)):
        stamp = (now + ahead).isoformat()
        with freeze_time(now):
            outcomes[name] = world.create(**extra, **{field: stamp})
    assert outcomes["at"]["ok"] is True, outcomes["at"]
    assert [d["field"] for d in outcomes["over"]["error"]["details"]] == [field]


@pytest.mark.parametrize("kind", ["cancel", "expire"])
def test_the_future_tolerance_of_ending_a_call(world: World, kind: CommandKind) -> None:
    now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    field = {"cancel": "cancelledAt", "expire": "expiredAt"}[kind]
    over = FUTURE_TOLERANCE + timedelta(microseconds=1)
    for ahead, ok in ((FUTURE_TOLERANCE, True), (over, False)):
        call = world.new_call()
        with freeze_time(now):
            outcome = world.send(kind, {"callUuid": call, field: (now + ahead).isoformat()})
        assert outcome["ok"] is ok, outcome
