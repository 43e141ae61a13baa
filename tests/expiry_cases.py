"""One table of expiry cases, run against the domain policy, the fake sweep and the SQL sweep."""

from __future__ import annotations

from dataclasses import dataclass

from calls_worker.domain.model import CallStatus


@dataclass(frozen=True)
class ExpiryCase:
    name: str
    status: CallStatus
    external: bool
    attempts: int
    max_call_attempts: int | None
    """The maximum of the called person's owning organization."""
    performing_max: int | None
    """The maximum of the organization performing the call: it must never matter."""
    expires: bool


R, C, X, E = CallStatus.REQUESTED, CallStatus.COMPLETED, CallStatus.CANCELLED, CallStatus.EXPIRED

EXPIRY_CASES = [
    ExpiryCase("below the maximum", R, False, 2, 3, 3, False),
    ExpiryCase("at the maximum", R, False, 3, 3, 3, True),
    ExpiryCase("over the maximum", R, False, 5, 3, 3, True),
    ExpiryCase("no attempts, maximum 1", R, False, 0, 1, 1, False),
    ExpiryCase("one attempt, maximum 1", R, False, 1, 1, 1, True),
    ExpiryCase("no maximum", R, False, 50, None, None, False),
    ExpiryCase("external call at the maximum", R, True, 3, 3, 3, False),
    ExpiryCase("completed at the maximum", C, False, 3, 3, 3, False),
    ExpiryCase("cancelled over the maximum", X, False, 4, 3, 3, False),
    ExpiryCase("expired already", E, False, 3, 3, 3, False),
    ExpiryCase("owner has a max, performer none", R, False, 3, 3, None, True),
    ExpiryCase("owner has none, performer a max", R, False, 3, None, 2, False),
    ExpiryCase("owner's max higher than performer's", R, False, 3, 5, 2, False),
    ExpiryCase("owner's max lower than performer's", R, False, 3, 2, 9, True),
]
