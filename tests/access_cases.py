"""One table of access cases (service account × scope × reach × command), run through the
path a worker's pool process applies commands by (tests/worker_path.py), on the fakes
(tests/unit/test_access.py) and on real PostgreSQL (tests/integration/test_access_db.py).

The scene: organizations A (the account's) and B; person ``pA`` owned by A and ``pB`` owned
by B; calls performed by A for pB (``A_for_B``, reached through the performing
organization), by B for pA (``B_for_A``, reached through the person), by B for pB
(``B_for_B``, out of reach), and a call uuid that exists nowhere (``missing``).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID, uuid4

from calls_worker.domain.access import SCOPES, AccessPolicy
from calls_worker.domain.commands import CommandKind
from calls_worker.domain.outcome import Outcome
from tests.worker_path import Bound

ISSUED = "2026-03-01T09:00:00+00:00"
FAR_FUTURE = "2099-01-01T00:00:00+00:00"
CERT_A = "a" * 64
CERT_B = "b" * 64

Target = Literal["pA", "pB", "no person", "A_for_B", "B_for_A", "B_for_B", "missing"]
Account = Literal[
    "none", "full", "lacks scope", "unknown", "disabled", "signed by it", "signed by another",
    "no certificate",
]  # fmt: skip


@dataclass(frozen=True)
class AccessCase:
    name: str
    kind: CommandKind
    target: Target
    account: Account
    expected: str
    """``ok`` or the error code."""
    error_field: str | None = None
    """The field the error names."""
    reason: str | None = None
    """Part of the reason given for that field."""
    required: bool = False
    """CALLS_WORKER_REQUIRE_SERVICE_ACCOUNT."""
    ended: bool = False
    """The call targeted is completed already."""
    extra: dict[str, Any] = field(default_factory=dict)
    bound: Bound = "own"
    """What a signed message's signedFor names."""


SCOPE = {
    "create": "calls:create", "add_attempt": "calls:attempt", "complete": "calls:complete",
    "cancel": "calls:cancel", "expire": "calls:expire",
}  # fmt: skip
CALL_KINDS: tuple[CommandKind, ...] = ("add_attempt", "complete", "cancel", "expire")
ACCOUNT_FIELD = "serviceAccountUuid"


def _cases() -> list[AccessCase]:
    cases = [
        AccessCase("create for a person it reaches", "create", "pA", "full", "ok"),
        AccessCase("create for a person of another owner", "create", "pB", "full",
                   "not_found", "personUuid", "does not exist"),
        AccessCase("create for a person that does not exist", "create", "no person", "full",
                   "not_found", "personUuid", "does not exist"),
        AccessCase("create without an account, none required", "create", "pB", "none", "ok"),
        AccessCase("create without an account, one required", "create", "pA", "none",
                   "forbidden", ACCOUNT_FIELD, "missing", required=True),
        AccessCase("unknown account", "create", "pA", "unknown",
                   "forbidden", ACCOUNT_FIELD, "unknown or disabled"),
        AccessCase("disabled account", "create", "pA", "disabled",
                   "forbidden", ACCOUNT_FIELD, "unknown or disabled"),
        # Order: malformed before everything, scope before reach, reach before the rules.
        AccessCase("far-future timestamp and an unknown account", "create", "pA", "unknown",
                   "invalid", "createdAt", extra={"createdAt": FAR_FUTURE}),
        AccessCase("missing scope and out of reach", "create", "pB", "lacks scope",
                   "forbidden", ACCOUNT_FIELD, "lacks the scope calls:create"),
        AccessCase("disabled, missing scope", "create", "pA", "disabled",
                   "forbidden", ACCOUNT_FIELD, "unknown or disabled"),
        # Signed messages: the account named must be the one whose certificate signed.
        AccessCase("signed by the account's certificate", "create", "pA", "signed by it", "ok"),
        AccessCase("signed by another certificate", "create", "pA", "signed by another",
                   "forbidden", ACCOUNT_FIELD, "whose certificate signed"),
        AccessCase("signed, account without a certificate", "create", "pA", "no certificate",
                   "forbidden", ACCOUNT_FIELD, "has no certificate"),
        # Signing covers the body, not the headers: the body names its id and task.
        AccessCase("signed, relabelled as another task", "create", "pA", "signed by it",
                   "invalid", "signedFor", "names", bound="other task"),
        AccessCase("signed, sent again under another id", "create", "pA", "signed by it",
                   "invalid", "signedFor", "names", bound="other id"),
        AccessCase("signed, naming neither id nor task", "create", "pA", "signed by it",
                   "invalid", "signedFor", "missing", bound="missing"),
    ]  # fmt: skip
    for kind in CALL_KINDS:
        cases += [
            AccessCase(f"{kind} on a call it performs", kind, "A_for_B", "full", "ok"),
            AccessCase(f"{kind} on a call of a person it owns", kind, "B_for_A", "full", "ok"),
            AccessCase(f"{kind} on a call out of reach", kind, "B_for_B", "full",
                       "not_found", "callUuid", "does not exist"),
            AccessCase(f"{kind} on a call that does not exist", kind, "missing", "full",
                       "not_found", "callUuid", "does not exist"),
            AccessCase(f"{kind} without the scope", kind, "A_for_B", "lacks scope",
                       "forbidden", ACCOUNT_FIELD, f"lacks the scope {SCOPE[kind]}"),
            AccessCase(f"{kind} out of reach on an ended call", kind, "B_for_B", "full",
                       "not_found", "callUuid", ended=True),
            AccessCase(f"{kind} in reach on an ended call", kind, "B_for_A", "full",
                       "conflict", ended=True),
            AccessCase(f"{kind} without an account, one required", kind, "B_for_B", "none",
                       "forbidden", ACCOUNT_FIELD, "missing", required=True),
            AccessCase(f"{kind} without an account, none required", kind, "B_for_B", "none",
                       "ok"),
        ]  # fmt: skip
    return cases


ACCESS_CASES = _cases()


class World(abc.ABC):
    """Where the scene is built and commands are handled: the fakes or PostgreSQL."""

    @abc.abstractmethod
    def organization(self) -> UUID: ...

    @abc.abstractmethod
    def person(self, owner: UUID) -> UUID: ...

    @abc.abstractmethod
    def call(self, person: UUID, performer: UUID, *, completed: bool) -> UUID: ...

    @abc.abstractmethod
    def account(
        self, organization: UUID, scopes: list[str], *, disabled: bool, certificate: str | None
    ) -> UUID: ...

    @abc.abstractmethod
    def handle(
        self, kind: CommandKind, command: dict[str, Any], *, policy: AccessPolicy,
        signer: str | None, bound: Bound = "own",
    ) -> Outcome: ...  # fmt: skip


def command_for(case: AccessCase, target: UUID, organization: UUID) -> dict[str, Any]:
    user = str(uuid4())
    bodies: dict[str, dict[str, Any]] = {
        "create": {"personUuid": str(target), "organizationUuid": str(organization)},
        "add_attempt": {"callUuid": str(target), "userUuid": user, "attemptedAt": ISSUED},
        "complete": {"callUuid": str(target), "userUuid": user, "result": "reached"},
        "cancel": {"callUuid": str(target)},
        "expire": {"callUuid": str(target)},
    }
    return {"issuedAt": ISSUED, **bodies[case.kind], **case.extra}


def run(world: World, case: AccessCase) -> tuple[Outcome, UUID]:
    """Build the scene, handle the case's command; its outcome and the target's uuid."""
    a, b = world.organization(), world.organization()
    people = {"pA": world.person(a), "pB": world.person(b), "no person": uuid4()}
    ended = case.ended
    calls = {
        "A_for_B": world.call(people["pB"], a, completed=ended),
        "B_for_A": world.call(people["pA"], b, completed=ended),
        "B_for_B": world.call(people["pB"], b, completed=ended),
        "missing": uuid4(),
    }
    target = {**people, **calls}[case.target]
    all_scopes: list[str] = list(SCOPES)
    signed = case.account in ("signed by it", "signed by another", "no certificate")
    accounts: dict[str, UUID | None] = {"none": None, "unknown": uuid4()}
    if case.account in ("full", "signed by it", "signed by another"):
        accounts[case.account] = world.account(a, all_scopes, disabled=False, certificate=CERT_A)
    elif case.account == "no certificate":
        accounts[case.account] = world.account(a, all_scopes, disabled=False, certificate=None)
    elif case.account == "lacks scope":
        scopes = [s for s in all_scopes if s != SCOPE[case.kind]]
        accounts[case.account] = world.account(a, scopes, disabled=False, certificate=CERT_A)
    elif case.account == "disabled":
        scopes = [s for s in all_scopes if s != SCOPE[case.kind]]
        accounts[case.account] = world.account(a, scopes, disabled=True, certificate=CERT_A)
    command = command_for(case, target, a)
    if (named := accounts[case.account]) is not None:
        command["serviceAccountUuid"] = str(named)
    signer = {"signed by it": CERT_A, "signed by another": CERT_B}.get(case.account)
    policy = AccessPolicy(require_service_account=case.required, signed=signed)
    outcome = world.handle(case.kind, command, policy=policy, signer=signer, bound=case.bound)
    return outcome, target


def check(case: AccessCase, outcome: Outcome) -> None:
    if case.expected == "ok":
        assert outcome["ok"], outcome
        return
    assert not outcome["ok"], outcome
    error = outcome["error"]
    assert error["code"] == case.expected, outcome
    if case.error_field is not None:
        named = {d["field"]: d["reason"] for d in error["details"]}
        assert case.error_field in named, outcome
        assert case.reason is None or case.reason in named[case.error_field], outcome


def anonymous(outcome: Outcome, uuid: UUID) -> Outcome:
    """The outcome with ``uuid`` blanked, to compare the answers about two different rows."""
    text = re.sub(str(uuid), "<uuid>", repr(outcome))
    return {"text": text}


def same_as_missing(world: World, case: AccessCase) -> None:
    """An out-of-reach row answers exactly as one that does not exist."""
    missing = {"create": "no person"}.get(case.kind, "missing")
    seen, target = run(world, case)
    twin_case = AccessCase(case.name, case.kind, missing, case.account, case.expected)  # type: ignore[arg-type]
    twin, twin_target = run(world, twin_case)
    assert anonymous(seen, target) == anonymous(twin, twin_target)
