"""The abstractions handlers work through; adapters/db implements them on PostgreSQL.

A unit of work is one transaction: it rolls back unless told to commit.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self
from uuid import UUID

from calls_worker.domain.model import Call, CallAttempt
from calls_worker.domain.outcome import Outcome


@dataclass(frozen=True)
class References:
    """What exists of the rows a new call points at."""

    person_exists: bool
    organization_exists: bool
    pledge_case_person_uuid: UUID | None
    """The person the named pledge case belongs to; None when none was named or it is missing."""


@dataclass(frozen=True)
class Batch:
    """What one sweep batch did: due calls it took up, and how many of them it expired."""

    examined: int
    expired: int


class CallRepository(abc.ABC):
    """Calls and their attempts."""

    @abc.abstractmethod
    def get_for_update(self, call_uuid: UUID) -> Call | None:
        """The call with its attempts, locked until the unit of work ends; None if missing."""

    @abc.abstractmethod
    def add(self, call: Call) -> bool:
        """Insert a new call and its attempts; False (and nothing written) if the uuid exists.

        Waits for a concurrent insert of the same uuid to commit or roll back.
        """

    @abc.abstractmethod
    def add_attempt(self, call: Call, attempt: CallAttempt) -> None:
        """Store ``attempt`` (already appended to ``call``) and the call's ``updated_at``."""

    @abc.abstractmethod
    def save_state(self, call: Call) -> None:
        """Store the call's status, result and timestamps after a transition."""

    @abc.abstractmethod
    def references(
        self, person_uuid: UUID, organization_uuid: UUID, pledge_case_uuid: UUID | None
    ) -> References:
        """Look up, in one go, the rows a new call would point at."""

    @abc.abstractmethod
    def expire_exhausted(self, now: datetime, limit: int) -> Batch:
        """Expire up to ``limit`` of the calls due, oldest first, skipping any that another
        transaction holds (they are left for the next batch or sweep)."""


class ProcessedCommands(abc.ABC):
    """The outcome of every command handled, by command id: what makes commands idempotent."""

    @abc.abstractmethod
    def get(self, command_id: str) -> Outcome | None:
        """The outcome first recorded for this command id, if any."""

    @abc.abstractmethod
    def add(self, command_id: str, kind: str, call_uuid: UUID | None, outcome: Outcome) -> bool:
        """Record the outcome; False if this command id is recorded already.

        Waits for a concurrent record of the same id to commit or roll back.
        """


class UnitOfWork(abc.ABC):
    """One transaction over the repositories; rolled back on exit unless committed."""

    calls: CallRepository
    processed_commands: ProcessedCommands

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.rollback()

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def rollback(self) -> None:
        """Undo everything since the last commit; the unit of work stays usable."""
