"""Random command sequences against the handlers, checked against a simple model.

Only legal transitions happen, attempt counts are exact, end states are final, and a
redelivered command returns its first outcome without a second effect.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.handlers import handle
from tests.unit.fakes import FakeUnitOfWork

ISSUED = "2026-03-01T09:00:00+00:00"
END = {"complete": "completed", "cancel": "cancelled", "expire": "expired"}


class CallsMachine(RuleBasedStateMachine):
    calls = Bundle("calls")
    sent = Bundle("sent")

    def __init__(self) -> None:
        super().__init__()
        self.uow = FakeUnitOfWork()
        state = self.uow.committed
        self.organization = state.add_organization(3)
        self.person = state.add_person(self.organization)
        self.model: dict[UUID, dict[str, Any]] = {}  # uuid -> {"status", "attempts", "external"}
        self.outcomes: dict[str, Outcome] = {}

    def send(self, kind: CommandKind, payload: dict[str, Any], command_id: str) -> Outcome:
        outcome = handle(command_id, parse_command(kind, {"issuedAt": ISSUED, **payload}), self.uow)
        if command_id in self.outcomes:
            assert outcome == self.outcomes[command_id], "a redelivery gets the first outcome"
        self.outcomes.setdefault(command_id, outcome)
        return outcome

    @rule(target=calls, external=st.booleans())
    def create(self, external: bool) -> UUID:
        uuid = uuid4()
        payload: dict[str, Any] = {"uuid": str(uuid), "personUuid": str(self.person),
                                   "organizationUuid": str(self.organization)}  # fmt: skip
        if external:
            payload["externalMetadata"] = {"source": "test"}
        outcome = self.send("create", payload, f"create-{uuid}")
        assert outcome["ok"], outcome
        self.model[uuid] = {"status": "requested", "attempts": 0, "external": external}
        return uuid

    @rule(target=sent, call=calls, kind=st.sampled_from(["add_attempt", *END]))
    def act(self, call: UUID, kind: CommandKind) -> tuple[CommandKind, dict[str, Any], str]:
        payload: dict[str, Any] = {"callUuid": str(call)}
        if kind == "add_attempt":
            payload |= {"userUuid": str(uuid4()), "attemptedAt": ISSUED}
        if kind == "complete":
            payload |= {"userUuid": str(uuid4()), "result": "done"}
        command_id = str(uuid4())
        outcome = self.send(kind, payload, command_id)
        expected = self.model[call]
        legal = expected["status"] == "requested" and not expected["external"]
        assert outcome["ok"] is legal, (kind, expected, outcome)
        if not legal:
            assert outcome["error"]["code"] == "conflict"
        elif kind == "add_attempt":
            expected["attempts"] += 1
        else:
            expected["status"] = END[kind]
        return kind, payload, command_id

    @rule(delivery=sent)
    def redeliver(self, delivery: tuple[CommandKind, dict[str, Any], str]) -> None:
        self.send(*delivery)  # send() checks the outcome is the first one

    @rule()
    def sweep(self) -> None:
        from datetime import UTC, datetime

        from calls_worker.service.sweep import expire_exhausted_calls

        expire_exhausted_calls(lambda: self.uow, datetime(2026, 3, 2, tzinfo=UTC), 2)
        for expected in self.model.values():
            if expected["status"] == "requested" and not expected["external"] \
                    and expected["attempts"] >= 3:  # fmt: skip
                expected["status"] = "expired"

    @invariant()
    def the_store_matches_the_model(self) -> None:
        stored = self.uow.committed.calls
        assert set(stored) == set(self.model)
        for uuid, expected in self.model.items():
            assert stored[uuid].status.value == expected["status"]
            assert stored[uuid].attempt_count == expected["attempts"]


TestCalls = CallsMachine.TestCase
TestCalls.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
