from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from uuid import uuid4

import pytest

from calls_worker.domain.errors import CallManagedExternally, CallNotRequested
from calls_worker.domain.model import END_STATES, Call, CallAttempt, CallStatus, CallType

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


def a_call(**overrides: object) -> Call:
    fields: dict[str, object] = {
        "uuid": uuid4(),
        "status": CallStatus.REQUESTED,
        "type": CallType.VERIFICATION,
        "person_uuid": uuid4(),
        "organization_uuid": uuid4(),
        "created_at": T0,
        "updated_at": T0,
    }
    fields.update(overrides)
    return Call(**fields)  # type: ignore[arg-type]


TRANSITIONS: dict[str, Callable[[Call], None]] = {
    "add_attempt": lambda c: c.add_attempt(CallAttempt(uuid4(), T1), T1),
    "complete": lambda c: c.complete(uuid4(), "reached", T1),
    "cancel": lambda c: c.cancel(T1, T1),
    "expire": lambda c: c.expire(T1, T1),
}


def test_complete_sets_result_and_timestamps() -> None:
    call, user = a_call(), uuid4()
    call.complete(user, "donor reached", T1)
    assert (call.status, call.result, call.completed_by) == (
        CallStatus.COMPLETED,
        "donor reached",
        user,
    )
    assert call.completed_at == call.updated_at == T1


def test_cancel_and_expire_keep_the_given_time() -> None:
    cancelled, expired = a_call(), a_call()
    cancelled.cancel(T0, T1)
    expired.expire(T0, T1)
    assert (cancelled.status, cancelled.cancelled_at, cancelled.updated_at) == (
        CallStatus.CANCELLED,
        T0,
        T1,
    )
    assert (expired.status, expired.expired_at, expired.updated_at) == (CallStatus.EXPIRED, T0, T1)


def test_attempts_are_counted() -> None:
    call = a_call()
    for _ in range(3):
        TRANSITIONS["add_attempt"](call)
    assert call.attempt_count == 3
    assert call.status is CallStatus.REQUESTED


@pytest.mark.parametrize("end_state", sorted(END_STATES))
@pytest.mark.parametrize("action", sorted(TRANSITIONS))
def test_end_states_are_final(end_state: CallStatus, action: str) -> None:
    call = a_call(status=end_state)
    with pytest.raises(CallNotRequested, match=f"it is {end_state.value}, an end state"):
        TRANSITIONS[action](call)
    assert call.status is end_state
    assert call.attempts == []
    assert call.updated_at == T0


@pytest.mark.parametrize("action", sorted(TRANSITIONS))
def test_external_calls_are_never_changed(action: str) -> None:
    call = a_call(external_metadata={})
    with pytest.raises(CallManagedExternally, match="managed by an external system"):
        TRANSITIONS[action](call)
    assert call.status is CallStatus.REQUESTED
    assert call.attempts == []
