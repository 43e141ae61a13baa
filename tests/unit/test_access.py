"""The access rules (domain/access.py) against the fakes: the table of tests/access_cases.py,
the order of the checks, and what the processed record keeps."""

from __future__ import annotations

import importlib
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest

from calls_worker.domain import access
from calls_worker.domain.access import AccessPolicy, ServiceAccount
from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.errors import DomainError
from calls_worker.domain.model import Call, CallStatus, CallType
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import handle
from tests.access_cases import ACCESS_CASES, AccessCase, World, check, run, same_as_missing
from tests.unit.fakes import FakeUnitOfWork
from tests.worker_path import Bound, send

WHEN = datetime(2026, 2, 1, tzinfo=UTC)


class FakeWorld(World):
    def __init__(self) -> None:
        self.uow = FakeUnitOfWork()
        self.kept: list[DomainError] = []

    def organization(self) -> UUID:
        return self.uow.committed.add_organization(3)

    def person(self, owner: UUID) -> UUID:
        return self.uow.committed.add_person(owner)

    def call(self, person: UUID, performer: UUID, *, completed: bool) -> UUID:
        uuid = uuid4()
        self.uow.committed.calls[uuid] = Call(
            uuid=uuid, status=CallStatus.COMPLETED if completed else CallStatus.REQUESTED,
            type=CallType.VERIFICATION, person_uuid=person, organization_uuid=performer,
            created_at=WHEN, updated_at=WHEN,
        )  # fmt: skip
        return uuid

    def account(
        self, organization: UUID, scopes: list[str], *, disabled: bool, certificate: str | None
    ) -> UUID:
        return self.uow.committed.add_service_account(
            organization, *scopes, disabled_at=WHEN if disabled else None,
            certificate_sha256=certificate,
        )  # fmt: skip

    def handle(
        self, kind: CommandKind, command: dict[str, Any], *, policy: AccessPolicy,
        signer: str | None, bound: Bound = "own",
    ) -> Outcome:  # fmt: skip
        applied = send(lambda: self.uow, kind, command, policy=policy, signer=signer,
                       bound=bound)  # fmt: skip
        if applied.refusal is not None:
            self.kept.append(applied.refusal)
        assert applied.outcome is not None
        return applied.outcome


@pytest.mark.parametrize("case", ACCESS_CASES, ids=lambda case: case.name)
def test_access_case(case: AccessCase) -> None:
    world = FakeWorld()
    outcome, _ = run(world, case)
    check(case, outcome)
    # Only a claim the signature does not back is kept for an operator.
    unbacked = case.account in ("signed by another", "no certificate")
    assert bool(world.kept) == (unbacked and case.bound == "own")


@pytest.mark.parametrize(
    "case",
    [c for c in ACCESS_CASES if c.target in ("pB", "B_for_B") and c.expected == "not_found"],
    ids=lambda case: case.name,
)
def test_out_of_reach_answers_as_missing(case: AccessCase) -> None:
    same_as_missing(FakeWorld(), case)


def test_a_refused_command_changes_nothing_and_keeps_its_sender() -> None:
    world = FakeWorld()
    a, b = world.organization(), world.organization()
    call = world.call(world.person(b), b, completed=False)
    account = world.account(a, ["calls:cancel"], disabled=False, certificate=None)
    command = {"callUuid": str(call), "serviceAccountUuid": str(account)}
    outcome = handle("c-1", parse_command("cancel", command), world.uow)
    assert outcome["error"]["code"] == "not_found"
    state = world.uow.committed
    assert state.calls[call].status is CallStatus.REQUESTED
    assert state.processed["c-1"] == outcome
    assert state.senders["c-1"] == account


def test_an_account_disabled_after_queueing_is_disabled_when_applied() -> None:
    world = FakeWorld()
    a = world.organization()
    account = world.account(a, ["calls:create"], disabled=False, certificate=None)
    command = parse_command(
        "create", {"personUuid": str(world.person(a)), "organizationUuid": str(a),
                   "serviceAccountUuid": str(account)},
    )  # fmt: skip  (parsed, as when queued)
    state = world.uow.committed
    state.service_accounts[account] = ServiceAccount(
        uuid=account, name="x", organization_uuid=a, scopes=frozenset({"calls:create"}),
        disabled_at=WHEN,
    )  # fmt: skip
    assert handle("c-2", command, world.uow)["error"]["code"] == "forbidden"


def test_a_pledge_case_of_a_person_out_of_reach_is_missing_to_the_account() -> None:
    world = FakeWorld()
    a, b = world.organization(), world.organization()
    mine, theirs = world.person(a), world.person(b)
    their_case = world.uow.committed.add_pledge_case(theirs)
    account = world.account(a, ["calls:create"], disabled=False, certificate=None)
    command = {"personUuid": str(mine), "organizationUuid": str(a),
               "pledgeCaseUuid": str(their_case), "serviceAccountUuid": str(account)}  # fmt: skip
    outcome = handle("c-3", parse_command("create", command), world.uow)
    # Without an account the pledge case exists and belongs to another person (invalid);
    # to the account it does not exist.
    assert outcome["error"]["code"] == "not_found"
    assert [d["field"] for d in outcome["error"]["details"]] == ["pledgeCaseUuid"]
    del command["serviceAccountUuid"]
    assert handle("c-4", parse_command("create", command), world.uow)["error"]["code"] == "invalid"


ME, OTHER = uuid4(), uuid4()
ORG = uuid4()
SHA, OTHER_SHA = "a" * 64, "b" * 64
ACCOUNTS = {
    ME: ServiceAccount(ME, "me", ORG, frozenset({"calls:create"}), certificate_sha256=SHA),
    OTHER: ServiceAccount(OTHER, "other", ORG, frozenset(access.SCOPES),
                          certificate_sha256=OTHER_SHA),
}  # fmt: skip
REQUIRED = AccessPolicy(require_service_account=True)
SIGNED = AccessPolicy(require_service_account=True, signed=True)
OPEN = AccessPolicy()

# (policy, the account the query names, its signer, who sent the command) → readable
OUTCOME_CASES: list[tuple[str, AccessPolicy, UUID | None, str | None, UUID | None, bool]] = [
    ("the sender, accounts required", REQUIRED, ME, None, ME, True),
    ("another account of the same organization", REQUIRED, OTHER, None, ME, False),
    ("no account where one is required", REQUIRED, None, None, ME, False),
    ("an unknown account", REQUIRED, uuid4(), None, None, False),
    ("a command that named none, asked by an account", REQUIRED, ME, None, None, False),
    ("the sender, signed by its certificate", SIGNED, ME, SHA, ME, True),
    ("the sender's name, signed by another's certificate", SIGNED, ME, OTHER_SHA, ME, False),
    ("the sender's name, unsigned", SIGNED, ME, None, ME, False),
    ("no account where none is required: anyone's", OPEN, None, None, ME, True),
    ("no account where none is required: a command without", OPEN, None, None, None, True),
    ("an account where none is required: only its own", OPEN, OTHER, None, ME, False),
    ("an account where none is required: its own", OPEN, ME, None, ME, True),
]  # fmt: skip


@pytest.mark.parametrize(("name", "policy", "named", "signer", "sender", "readable"),
                         OUTCOME_CASES, ids=[case[0] for case in OUTCOME_CASES])  # fmt: skip
def test_who_may_read_an_outcome(name: str, policy: AccessPolicy, named: UUID | None,
                                 signer: str | None, sender: UUID | None,
                                 readable: bool) -> None:  # fmt: skip
    account = None if named is None else ACCOUNTS.get(named)
    caller = access.Caller(named, signer)
    assert access.may_read_outcome(policy, caller, account, sender) is readable


def _failing_cases() -> list[str]:
    """The cases of the table that fail as things stand (none, unless a check is gone)."""
    failing = []
    for case in ACCESS_CASES:
        try:
            outcome, _ = run(FakeWorld(), case)
            check(case, outcome)
        except AssertionError:
            failing.append(case.name)
    return failing


def _without_signer(original: Any) -> Any:
    return lambda named, kind, uow, *, policy, signer_sha256: original(
        named, kind, uow, policy=policy, signer_sha256=None)


def _no_account_checks(original: Any) -> Any:
    return lambda named, kind, uow, *, policy, signer_sha256: (
        None if named is None else uow.service_accounts.get(named))


def _authorize_with(change: Any) -> Any:
    def planted(original: Any) -> Any:
        return lambda policy, caller, account, scope: original(*change(policy, caller, account,
                                                                       scope))
    return planted


# Each check of the path a command takes, and how a plant drops it (by the name the path
# looks it up under).
DROPPED_CHECKS: dict[str, tuple[str, Any]] = {
    "signedFor names the message's own id and task": (
        "calls_worker.worker.messages.check_bound", lambda original: lambda *a, **k: None),
    "the signer is passed on": ("calls_worker.service.apply.acting_account", _without_signer),
    "the account is checked at all": (
        "calls_worker.service.apply.acting_account", _no_account_checks),
    "timestamps in the far future": (
        "calls_worker.service.apply.absurd_timestamps", lambda original: lambda *a: []),
    "an account is required where it must be": ("calls_worker.domain.access.authorize",
        _authorize_with(lambda p, c, a, s: (replace(p, require_service_account=False), c, a, s))),
    "the account signed the message": ("calls_worker.domain.access.authorize",
        _authorize_with(lambda p, c, a, s: (replace(p, signed=False), c, a, s))),
    "the account holds the scope": ("calls_worker.domain.access.authorize",
        _authorize_with(lambda p, c, a, s: (p, c, a, None))),
    "the account is enabled": ("calls_worker.domain.access.authorize",
        _authorize_with(lambda p, c, a, s: (p, c, a and replace(a, disabled_at=None), s))),
    "the account reaches the call": (
        "calls_worker.domain.access.reaches_call", lambda original: lambda *a: True),
    "the account reaches the person": (
        "calls_worker.domain.access.reaches_person",
        lambda original: lambda account, owner: owner is not None),
}  # fmt: skip


def test_the_table_passes_on_the_path_as_it_is() -> None:
    assert _failing_cases() == []


@pytest.mark.parametrize("dropped", DROPPED_CHECKS)
def test_dropping_any_check_fails_the_table(dropped: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target, plant = DROPPED_CHECKS[dropped]
    module, name = target.rsplit(".", 1)
    original = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(target, plant(original))
    assert _failing_cases(), f"the table still passes without: {dropped}"
