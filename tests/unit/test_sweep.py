from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest

from calls_worker.domain.model import Call, CallAttempt, CallStatus, CallType
from calls_worker.service.sweep import expire_exhausted_calls
from tests.expiry_cases import EXPIRY_CASES, ExpiryCase
from tests.unit.fakes import FakeUnitOfWork

NOW = datetime(2026, 4, 1, 6, 0, tzinfo=UTC)
EARLIER = datetime(2026, 3, 1, tzinfo=UTC)


def add_call(uow: FakeUnitOfWork, *, owner_max: int | None, performer_max: int | None,
             status: CallStatus = CallStatus.REQUESTED, external: bool = False,
             attempts: int = 0) -> Call:  # fmt: skip
    state = uow.committed
    person = state.add_person(state.add_organization(owner_max))
    call = Call(
        uuid=uuid4(),
        status=status,
        type=CallType.VERIFICATION,
        person_uuid=person,
        organization_uuid=state.add_organization(performer_max),
        created_at=EARLIER,
        updated_at=EARLIER,
        external_metadata={"source": "crm"} if external else None,
        attempts=[CallAttempt(uuid4(), EARLIER) for _ in range(attempts)],
    )
    state.calls[call.uuid] = call
    return call


@pytest.mark.parametrize("case", EXPIRY_CASES, ids=lambda c: c.name)
def test_fake_sweep_follows_the_table(case: ExpiryCase) -> None:
    uow = FakeUnitOfWork()
    call = add_call(uow, owner_max=case.max_call_attempts, performer_max=case.performing_max,
                    status=case.status, external=case.external, attempts=case.attempts)  # fmt: skip
    result = expire_exhausted_calls(lambda: uow, NOW, batch_size=10)
    after = uow.committed.calls[call.uuid]
    assert result.expired == int(case.expires)
    assert (after.status is CallStatus.EXPIRED) is (
        case.expires or case.status is CallStatus.EXPIRED
    )
    assert (after.expired_at == NOW) is case.expires


def test_sweep_runs_in_batches_until_nothing_is_due() -> None:
    uow = FakeUnitOfWork()
    for _ in range(7):
        add_call(uow, owner_max=1, performer_max=None, attempts=1)
    add_call(uow, owner_max=2, performer_max=None, attempts=1)
    result = expire_exhausted_calls(lambda: uow, NOW, batch_size=3)
    assert (result.expired, result.batches) == (7, 3)
    assert uow.commits == 3


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        expire_exhausted_calls(FakeUnitOfWork, NOW, batch_size=0)
