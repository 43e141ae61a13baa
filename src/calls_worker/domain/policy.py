"""The expiry rule, in one place. Its SQL twin is the sweep's condition in adapters/db.

Both are run against one table of cases (tests/expiry_cases.py) so they cannot drift.
"""

from __future__ import annotations

from calls_worker.domain.model import CallStatus


def is_exhausted(
    *,
    status: CallStatus,
    is_external: bool,
    attempt_count: int,
    max_call_attempts: int | None,
) -> bool:
    """Whether a call must be expired automatically.

    True when the call is requested, managed here, and its person's owning organization has
    a maximum that the attempts have reached. ``max_call_attempts`` is that organization's
    maximum (``None``: no limit) — not the maximum of the organization performing the call.
    """
    return (
        status is CallStatus.REQUESTED
        and not is_external
        and max_call_attempts is not None
        and attempt_count >= max_call_attempts
    )
