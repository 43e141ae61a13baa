"""Random command sequences, applied as a worker's pool process applies them
(tests/worker_path.py), checked against a simple model.

Only legal transitions happen, attempt counts are exact, end states are final, and a
redelivered command returns its first outcome without a second effect. Commands are sent
with or without a service account (of either of two organizations, with any scopes,
disabled at any moment): each gets what the access rules say, in their order, and a
refused command changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule

from calls_worker.domain.access import SCOPE_OF, SCOPES, ServiceAccount
from calls_worker.domain.commands import CommandKind
from calls_worker.domain.outcome import Outcome
from tests.unit.fakes import FakeUnitOfWork
from tests.worker_path import send

ISSUED = "2026-03-01T09:00:00+00:00"
NOW = datetime(2026, 3, 2, tzinfo=UTC)
END = {"complete": "completed", "cancel": "cancelled", "expire": "expired"}


class CallsMachine(RuleBasedStateMachine):
    calls = Bundle("calls")
    sent = Bundle("sent")
    accounts = Bundle("accounts")

    def __init__(self) -> None:
        super().__init__()
        self.uow = FakeUnitOfWork()
        state = self.uow.committed
        self.organizations = [state.add_organization(3), state.add_organization(3)]
        self.persons = [state.add_person(org) for org in self.organizations]
        self.organization, self.person = self.organizations[0], self.persons[0]
        self.owner = dict(zip(self.persons, self.organizations, strict=True))
        self.model: dict[UUID, dict[str, Any]] = {}  # uuid -> {"status", "attempts", ...}
        self.outcomes: dict[str, Outcome] = {}

    def send(self, kind: CommandKind, payload: dict[str, Any], command_id: str) -> Outcome:
        applied = send(lambda: self.uow, kind, {"issuedAt": ISSUED, **payload},
                       command_id=command_id)  # fmt: skip
        assert applied.outcome is not None
        outcome = applied.outcome
        if command_id in self.outcomes:
            assert outcome == self.outcomes[command_id], "a redelivery gets the first outcome"
        self.outcomes.setdefault(command_id, outcome)
        return outcome

    def refusal(self, account: UUID | None, kind: str, *reaching: UUID) -> str | None:
        """What the access rules answer before the domain rules: forbidden, not_found, or
        None (go on). ``reaching``: the organizations whose accounts reach the row."""
        if account is None:
            return None
        held = self.uow.committed.service_accounts[account]
        if held.disabled or SCOPE_OF[kind] not in held.scopes:
            return "forbidden"
        return None if held.organization_uuid in reaching else "not_found"

    @rule(target=accounts, which=st.integers(0, 1), scopes=st.sets(st.sampled_from(SCOPES)))
    def add_account(self, which: int, scopes: set[str]) -> UUID:
        return self.uow.committed.add_service_account(self.organizations[which], *scopes)

    @rule(account=accounts)
    def disable(self, account: UUID) -> None:
        held = self.uow.committed.service_accounts[account]
        self.uow.committed.service_accounts[account] = ServiceAccount(
            held.uuid, held.name, held.organization_uuid, held.scopes, disabled_at=NOW
        )

    @rule(target=calls, external=st.booleans(), person=st.integers(0, 1),
          performer=st.integers(0, 1), account=st.none() | accounts)  # fmt: skip
    def create(self, external: bool, person: int, performer: int, account: UUID | None) -> Any:
        uuid = uuid4()
        called, performing = self.persons[person], self.organizations[performer]
        payload: dict[str, Any] = {"uuid": str(uuid), "personUuid": str(called),
                                   "organizationUuid": str(performing)}  # fmt: skip
        if external:
            payload["externalMetadata"] = {"source": "test"}
        if account is not None:
            payload["serviceAccountUuid"] = str(account)
        outcome = self.send("create", payload, f"create-{uuid}")
        refused = self.refusal(account, "create", self.owner[called])
        if refused is not None:
            assert outcome["error"]["code"] == refused, outcome
            return multiple()
        assert outcome["ok"], outcome
        self.model[uuid] = {"status": "requested", "attempts": 0, "external": external,
                            "reaching": {performing, self.owner[called]}}  # fmt: skip
        return uuid

    @rule(target=sent, call=calls, kind=st.sampled_from(["add_attempt", *END]),
          account=st.none() | accounts)  # fmt: skip
    def act(
        self, call: UUID, kind: CommandKind, account: UUID | None
    ) -> tuple[CommandKind, dict[str, Any], str]:
        payload: dict[str, Any] = {"callUuid": str(call)}
        if kind == "add_attempt":
            payload |= {"userUuid": str(uuid4()), "attemptedAt": ISSUED}
        if kind == "complete":
            payload |= {"userUuid": str(uuid4()), "result": "done"}
        if account is not None:
            payload["serviceAccountUuid"] = str(account)
        command_id = str(uuid4())
        outcome = self.send(kind, payload, command_id)
        expected = self.model[call]
        refused = self.refusal(account, kind, *expected["reaching"])
        if refused is not None:
            assert outcome["error"]["code"] == refused, (kind, expected, outcome)
            return kind, payload, command_id
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
