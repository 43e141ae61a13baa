"""A call, its attempts and its status machine: ``requested`` → ``completed|cancelled|expired``."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from calls_worker.domain.errors import CallManagedExternally, CallNotRequested


class CallStatus(StrEnum):
    """Where a call stands; every status but ``requested`` is an end state."""

    REQUESTED = "requested"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class CallType(StrEnum):
    """Why the person is called."""

    VERIFICATION = "verification"
    HAPPY_CALL = "happy_call"
    WINBACK = "winback"


END_STATES = frozenset({CallStatus.COMPLETED, CallStatus.CANCELLED, CallStatus.EXPIRED})


@dataclass(frozen=True)
class CallAttempt:
    """One try to reach the person."""

    user_uuid: UUID
    attempted_at: datetime


def _when(attempt: CallAttempt) -> datetime:
    return attempt.attempted_at


@dataclass
class Call:
    """A call as the API knows it. Mutating methods enforce the status machine.

    A call with ``external_metadata`` is managed by an external system: it is stored as
    given and never changed here.
    """

    uuid: UUID
    status: CallStatus
    type: CallType
    person_uuid: UUID
    organization_uuid: UUID
    created_at: datetime
    updated_at: datetime
    pledge_case_uuid: UUID | None = None
    requested_by: UUID | None = None
    result: str | None = None
    notes: str | None = None
    external_metadata: dict[str, Any] | None = None
    attempts: list[CallAttempt] = field(default_factory=list)
    completed_by: UUID | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    expired_at: datetime | None = None
    owning_organization_uuid: UUID | None = None
    """The organization owning the called person (its maximum applies; its service accounts
    reach the call), where it was read with the call; not part of the call's JSON."""

    @property
    def is_external(self) -> bool:
        """Managed by an external system (``externalMetadata`` present, even if empty)."""
        return self.external_metadata is not None

    @property
    def attempt_count(self) -> int:
        return len(self.attempts)

    def add_attempt(self, attempt: CallAttempt, now: datetime) -> None:
        """Record a try, among the others in the order of their ``attempted_at`` (the order
        a call read from the database shows them in: an attempt made earlier can arrive
        later). Raises CallManagedExternally or CallNotRequested."""
        self._ensure_changeable("add an attempt to")
        bisect.insort(self.attempts, attempt, key=_when)
        self.updated_at = now

    def complete(self, user_uuid: UUID, result: str, now: datetime) -> None:
        """The person was reached. Raises CallManagedExternally or CallNotRequested."""
        self._ensure_changeable("complete")
        self.status = CallStatus.COMPLETED
        self.completed_by = user_uuid
        self.result = result
        self.completed_at = now
        self.updated_at = now

    def cancel(self, cancelled_at: datetime, now: datetime) -> None:
        """The call will not be made. Raises CallManagedExternally or CallNotRequested."""
        self._ensure_changeable("cancel")
        self.status = CallStatus.CANCELLED
        self.cancelled_at = cancelled_at
        self.updated_at = now

    def expire(self, expired_at: datetime, now: datetime) -> None:
        """The person was not reached in time. Raises CallManagedExternally or CallNotRequested."""
        self._ensure_changeable("expire")
        self.status = CallStatus.EXPIRED
        self.expired_at = expired_at
        self.updated_at = now

    def _ensure_changeable(self, action: str) -> None:
        if self.is_external:
            raise CallManagedExternally(
                f"cannot {action} call {self.uuid}: it is managed by an external system "
                "(it has externalMetadata) and is not editable here"
            )
        if self.status is not CallStatus.REQUESTED:
            raise CallNotRequested(
                f"cannot {action} call {self.uuid}: it is {self.status.value}, an end state; "
                "only a requested call can change"
            )
