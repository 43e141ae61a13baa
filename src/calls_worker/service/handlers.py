"""One handler per command: load, ask the domain, store. service/apply.py runs them
(idempotent, with their checks, in batches).

Every handler runs inside the caller's unit of work and raises DomainError for a broken
rule; apply.py turns that into an error outcome and records whichever outcome it got
in the same transaction as the effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from calls_worker.domain import access
from calls_worker.domain.access import AccessPolicy, Caller, ServiceAccount
from calls_worker.domain.commands import (
    AddCallAttempt,
    CancelCall,
    Command,
    CompleteCall,
    CreateCall,
    ExpireCall,
)
from calls_worker.domain.errors import (
    FieldError,
    InvalidCommand,
    NotFound,
)
from calls_worker.domain.model import Call, CallAttempt, CallStatus, CallType
from calls_worker.service.unit_of_work import (
    References,
    UnitOfWork,
)


def utc_now() -> datetime:
    """The one clock: where the worker's time enters (freezegun patches it in tests)."""
    return datetime.now(UTC)


def acting_account(
    named: UUID | None, kind: str, uow: UnitOfWork, *, policy: AccessPolicy,
    signer_sha256: str | None,
) -> ServiceAccount | None:  # fmt: skip
    """Steps 2 and 3 of the checks, with the account as the store holds it now: the account
    acting, or None (none named, none required). Raises Forbidden."""
    if named is None and not policy.require_service_account:
        return None
    account = None if named is None else uow.service_accounts.get(named)
    return access.authorize(policy, Caller(named, signer_sha256), account, access.SCOPE_OF[kind])


def create_call(
    command: CreateCall, uow: UnitOfWork, now: datetime, account: ServiceAccount | None = None
) -> Call:
    """Create a call managed here (as requested) or externally (stored as given).

    The rows it points at are not read first: their foreign keys find a missing one at
    commit (MissingReference, see apply.py). They are read when a service account acts
    (a person it does not reach is missing to it), and a pledge case named for a call
    managed here is, since it must be a pledge case of the person called.
    """
    call = _external_call(command, now) if command.is_external else _managed_call(command, now)
    checks_pledge_case = command.pledge_case_uuid is not None and not call.is_external
    if account is not None or checks_pledge_case:
        refs = references(command, uow, account)
        if (missing := not_found(command, refs)).details:
            raise missing
        if checks_pledge_case and refs.pledge_case_person_uuid != command.person_uuid:
            raise InvalidCommand(
                f"pledge case {command.pledge_case_uuid} belongs to another person",
                [FieldError("pledgeCaseUuid", "must be a pledge case of the person called")],
            )
    uow.calls.add(call)  # a taken uuid or a missing reference is found out at commit
    return call


def references(
    command: CreateCall, uow: UnitOfWork, account: ServiceAccount | None
) -> References:
    """The rows a create names, as ``account`` sees them: a person it does not reach, or a
    pledge case of such a person, is missing to it, exactly as one that does not exist."""
    refs = uow.calls.references(
        command.person_uuid, command.organization_uuid, command.pledge_case_uuid
    )
    if account is None:
        return refs
    return replace(
        refs,
        person_exists=access.reaches_person(account, refs.person_owning_organization_uuid),
        pledge_case_person_uuid=refs.pledge_case_person_uuid
        if access.reaches_person(account, refs.pledge_case_owning_organization_uuid)
        else None,
    )


def not_found(command: CreateCall, refs: References) -> NotFound:
    """Which of the rows a create names do not exist, as its error."""
    missing = [
        FieldError(name, "does not exist")
        for name, exists in (
            ("personUuid", refs.person_exists),
            ("organizationUuid", refs.organization_exists),
            (
                "pledgeCaseUuid",
                command.pledge_case_uuid is None or refs.pledge_case_person_uuid is not None,
            ),
        )
        if not exists
    ]
    # None missing now: one was created since the commit that missed it. That commit
    # still saw it missing, which is the answer for this command.
    fields = ", ".join(m.field for m in missing) or "a row it names"
    return NotFound(f"create refers to rows that do not exist: {fields}", missing)


def _common(command: CreateCall, now: datetime) -> dict[str, Any]:
    return {
        "uuid": command.uuid or uuid4(),
        "person_uuid": command.person_uuid,
        "organization_uuid": command.organization_uuid,
        "pledge_case_uuid": command.pledge_case_uuid,
        "requested_by": command.requested_by,
        "notes": command.notes,
        "created_at": command.created_at or now,
        "updated_at": now,
    }


def _managed_call(command: CreateCall, now: datetime) -> Call:
    return Call(
        status=CallStatus.REQUESTED,
        type=command.type or CallType.VERIFICATION,
        **_common(command, now),
    )


def _external_call(command: CreateCall, now: datetime) -> Call:
    return Call(
        status=command.status or CallStatus.REQUESTED,
        type=CallType.VERIFICATION,
        external_metadata=command.external_metadata,
        # In the order of attemptedAt, as a read of the call shows them.
        attempts=sorted(
            (CallAttempt(a.user_uuid, a.attempted_at) for a in command.attempts or ()),
            key=lambda a: a.attempted_at,
        ),
        result=command.result,
        completed_at=command.completed_at,
        cancelled_at=command.cancelled_at,
        **_common(command, now),
    )


def _load(uow: UnitOfWork, call_uuid: UUID, account: ServiceAccount | None) -> Call:
    """The call, locked; NotFound if it does not exist or ``account`` does not reach it
    (the same error: existence is not revealed)."""
    call = uow.calls.get_for_update(call_uuid)
    if call is None or not access.reaches_call(
        account, call.organization_uuid, call.owning_organization_uuid
    ):
        raise NotFound(
            f"call {call_uuid} does not exist", [FieldError("callUuid", "does not exist")]
        )
    return call


def add_call_attempt(
    command: AddCallAttempt, uow: UnitOfWork, now: datetime, account: ServiceAccount | None = None
) -> Call:
    call = _load(uow, command.call_uuid, account)
    attempt = CallAttempt(command.user_uuid, command.attempted_at)
    call.add_attempt(attempt, now)
    uow.calls.add_attempt(call, attempt)
    return call


def complete_call(
    command: CompleteCall, uow: UnitOfWork, now: datetime, account: ServiceAccount | None = None
) -> Call:
    call = _load(uow, command.call_uuid, account)
    call.complete(command.user_uuid, command.result, now)
    uow.calls.save_state(call)
    return call


def cancel_call(
    command: CancelCall, uow: UnitOfWork, now: datetime, account: ServiceAccount | None = None
) -> Call:
    call = _load(uow, command.call_uuid, account)
    call.cancel(command.cancelled_at or now, now)
    uow.calls.save_state(call)
    return call


def expire_call(
    command: ExpireCall, uow: UnitOfWork, now: datetime, account: ServiceAccount | None = None
) -> Call:
    call = _load(uow, command.call_uuid, account)
    call.expire(command.expired_at or now, now)
    uow.calls.save_state(call)
    return call


Handler = Callable[[Any, UnitOfWork, datetime, ServiceAccount | None], Call]

HANDLERS: dict[type[Command], Handler] = {
    CreateCall: create_call,
    AddCallAttempt: add_call_attempt,
    CompleteCall: complete_call,
    CancelCall: cancel_call,
    ExpireCall: expire_call,
}
