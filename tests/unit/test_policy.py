from __future__ import annotations

import pytest

from calls_worker.domain.policy import is_exhausted
from tests.expiry_cases import EXPIRY_CASES, ExpiryCase


@pytest.mark.parametrize("case", EXPIRY_CASES, ids=lambda c: c.name)
def test_policy_follows_the_table(case: ExpiryCase) -> None:
    assert (
        is_exhausted(
            status=case.status,
            is_external=case.external,
            attempt_count=case.attempts,
            max_call_attempts=case.max_call_attempts,
        )
        is case.expires
    )
