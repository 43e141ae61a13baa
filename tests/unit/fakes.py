"""In-memory stand-ins that subclass the real abstractions (no mocks)."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self
from uuid import UUID, uuid4

from calls_worker.domain.access import ServiceAccount
from calls_worker.domain.errors import CallsWorkerError
from calls_worker.domain.model import Call, CallAttempt, CallStatus
from calls_worker.domain.outcome import Outcome
from calls_worker.domain.policy import is_exhausted
from calls_worker.service.unit_of_work import (
    Batch,
    CallRepository,
    CallUuidTaken,
    CommandRefused,
    DuplicateCommand,
    MissingReference,
    ProcessedCommands,
    References,
    ServiceAccounts,
    UnitOfWork,
)


@dataclass
class FakeState:
    """What a database would hold."""

    max_call_attempts: dict[UUID, int | None] = field(default_factory=dict)
    owning_organization: dict[UUID, UUID] = field(default_factory=dict)
    pledge_case_person: dict[UUID, UUID] = field(default_factory=dict)
    calls: dict[UUID, Call] = field(default_factory=dict)
    processed: dict[str, Outcome] = field(default_factory=dict)
    senders: dict[str, UUID | None] = field(default_factory=dict)
    """The service account each processed command named."""
    service_accounts: dict[UUID, ServiceAccount] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    """Uniqueness broken by pending writes; the real database says so at commit."""

    def add_organization(self, max_call_attempts: int | None = 3) -> UUID:
        uuid = uuid4()
        self.max_call_attempts[uuid] = max_call_attempts
        return uuid

    def add_person(self, owning_organization: UUID) -> UUID:
        uuid = uuid4()
        self.owning_organization[uuid] = owning_organization
        return uuid

    def add_service_account(self, organization: UUID, *scopes: str, **fields: Any) -> UUID:
        uuid = uuid4()
        self.service_accounts[uuid] = ServiceAccount(
            uuid=uuid, name="fake", organization_uuid=organization, scopes=frozenset(scopes),
            **fields,
        )  # fmt: skip
        return uuid

    def add_pledge_case(self, person: UUID) -> UUID:
        uuid = uuid4()
        self.pledge_case_person[uuid] = person
        return uuid


class FakeCallRepository(CallRepository):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def get_for_update(self, call_uuid: UUID) -> Call | None:
        call = self.state.calls.get(call_uuid)
        if call is not None:
            call.owning_organization_uuid = self.state.owning_organization.get(call.person_uuid)
        return call

    def add(self, call: Call) -> None:
        if call.uuid in self.state.calls:
            self.state.violations.append("call uuid taken")
            return
        if (
            call.person_uuid not in self.state.owning_organization
            or call.organization_uuid not in self.state.max_call_attempts
            or (
                call.pledge_case_uuid is not None
                and call.pledge_case_uuid not in self.state.pledge_case_person
            )
        ):
            self.state.violations.append("missing reference")
            return
        self.state.calls[call.uuid] = call

    def add_attempt(self, call: Call, attempt: CallAttempt) -> None:
        assert self.state.calls[call.uuid] is call

    def save_state(self, call: Call) -> None:
        assert self.state.calls[call.uuid] is call

    def references(
        self, person_uuid: UUID, organization_uuid: UUID, pledge_case_uuid: UUID | None
    ) -> References:
        cases = self.state.pledge_case_person
        pledge_case_person = None if pledge_case_uuid is None else cases.get(pledge_case_uuid)
        return References(
            person_exists=person_uuid in self.state.owning_organization,
            organization_exists=organization_uuid in self.state.max_call_attempts,
            pledge_case_person_uuid=pledge_case_person,
            person_owning_organization_uuid=self.state.owning_organization.get(person_uuid),
            pledge_case_owning_organization_uuid=None
            if pledge_case_person is None
            else self.state.owning_organization.get(pledge_case_person),
        )

    def expire_exhausted(self, now: datetime, limit: int) -> Batch:
        due = [
            call
            for call in self.state.calls.values()
            if is_exhausted(
                status=call.status,
                is_external=call.is_external,
                attempt_count=call.attempt_count,
                max_call_attempts=self.state.max_call_attempts[
                    self.state.owning_organization[call.person_uuid]
                ],
            )
        ][:limit]
        by_organization: Counter[str] = Counter()
        for call in due:
            call.status = CallStatus.EXPIRED
            call.expired_at = call.updated_at = now
            by_organization[str(self.state.owning_organization[call.person_uuid])] += 1
        return Batch(examined=len(due), expired=len(due), by_organization=dict(by_organization),
                     expired_calls=tuple(call.uuid for call in due))  # fmt: skip


class FakeProcessedCommands(ProcessedCommands):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def get(self, command_id: str) -> Outcome | None:
        return self.state.processed.get(command_id)

    def add(
        self, command_id: str, kind: str, call_uuid: UUID | None, outcome: Outcome,
        service_account_uuid: UUID | None = None,
    ) -> None:  # fmt: skip
        if command_id in self.state.processed:
            self.state.violations.insert(0, "duplicate command")  # its write goes first
            return
        self.state.processed[command_id] = outcome
        self.state.senders[command_id] = service_account_uuid


class FakeServiceAccounts(ServiceAccounts):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def get(self, uuid: UUID) -> ServiceAccount | None:
        return self.state.service_accounts.get(uuid)


_VIOLATIONS: dict[str, type[CallsWorkerError]] = {
    "duplicate command": DuplicateCommand,
    "call uuid taken": CallUuidTaken,
    "missing reference": MissingReference,
}


class FakeUnitOfWork(UnitOfWork):
    """Works on a copy of ``committed``; commit publishes the copy, rollback drops it.

    Applies batches as the real one does: each command's writes can be discarded (the
    working copy as it was when the command started), and in a batch a broken uniqueness
    raises CommandRefused naming the command that broke it."""

    def __init__(self, committed: FakeState | None = None) -> None:
        self.committed = committed or FakeState()
        self.commits = 0
        self._begin()

    def __enter__(self) -> Self:
        self._begin()
        return self

    def _begin(self) -> None:
        self._use(copy.deepcopy(self.committed))
        self._batch = False
        self._tag: object = None
        self._before: dict[object, FakeState] = {}
        self._starts: list[tuple[object, int]] = []
        """Each command's tag, with how many violations there were when it started."""

    def _use(self, working: FakeState) -> None:
        self._working = working
        self.calls = FakeCallRepository(working)
        self.processed_commands = FakeProcessedCommands(working)
        self.service_accounts = FakeServiceAccounts(working)

    def begin_batch(
        self, command_ids: list[str], call_uuids: list[UUID], person_uuids: list[UUID]
    ) -> dict[str, Outcome]:
        self._batch = True
        processed = self._working.processed
        return {c: processed[c] for c in command_ids if c in processed}

    def start_command(self, tag: object) -> None:
        self._tag = tag
        self._before[tag] = copy.deepcopy(self._working)
        self._starts.append((tag, len(self._working.violations)))

    def discard_command(self, tag: object) -> None:
        self._use(self._before.pop(tag))

    def flush(self) -> None:
        self._refuse()

    def _refuse(self) -> None:
        violations = self._working.violations
        if not violations:
            return
        batch, current = self._batch, self._tag
        # The commands whose writes broke one (what the real one's message carried).
        ends = [start for _, start in self._starts[1:]] + [len(violations)]
        tags = {tag for (tag, start), end in zip(self._starts, ends, strict=True) if end > start}
        self.rollback()
        error = _VIOLATIONS[violations[0]]()
        if batch:
            raise CommandRefused(tags or {current}, error)
        raise error

    def commit(self) -> None:
        self._refuse()
        self.committed = copy.deepcopy(self._working)
        self.commits += 1

    def rollback(self) -> None:
        self._begin()
