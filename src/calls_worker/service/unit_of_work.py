"""The abstractions handlers work through; adapters/db implements them on PostgreSQL.

A unit of work is one transaction: it rolls back unless told to commit.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Self
from uuid import UUID

from calls_worker.domain.access import ServiceAccount
from calls_worker.domain.errors import CallsWorkerError
from calls_worker.domain.events import CallEvent
from calls_worker.domain.model import Call, CallAttempt
from calls_worker.domain.outcome import Outcome


@dataclass(frozen=True)
class References:
    """What exists of the rows a new call points at."""

    person_exists: bool
    organization_exists: bool
    pledge_case_person_uuid: UUID | None
    """The person the named pledge case belongs to; None when none was named or it is missing."""
    person_owning_organization_uuid: UUID | None = None
    """The organization owning the person (None: no such person)."""
    pledge_case_owning_organization_uuid: UUID | None = None
    """The organization owning the pledge case's person (None: none named, or missing)."""


@dataclass(frozen=True)
class Batch:
    """What one sweep batch did: due calls it took up, how many of them it expired, and how
    many it cleared from the record because their call had ended (or was external) already."""

    examined: int
    expired: int
    cleared: int = 0
    by_organization: Mapping[str, int] = field(default_factory=dict)
    """Calls expired, by the uuid of their person's owning organization."""
    expired_calls: tuple[UUID, ...] = ()


class CallRepository(abc.ABC):
    """Calls and their attempts."""

    @abc.abstractmethod
    def get_for_update(self, call_uuid: UUID) -> Call | None:
        """The call with its attempts and its person's owning organization, locked until the
        unit of work ends; None if missing."""

    @abc.abstractmethod
    def add(self, call: Call) -> None:
        """Insert a new call and its attempts at commit, which raises CallUuidTaken if a call
        with this uuid exists (waiting for a concurrent insert of it to end first), and
        MissingReference if its person, organization or pledge case does not exist."""

    @abc.abstractmethod
    def add_attempt(self, call: Call, attempt: CallAttempt) -> None:
        """At commit, store ``attempt`` (already appended to ``call``) and ``updated_at``."""

    @abc.abstractmethod
    def save_state(self, call: Call) -> None:
        """At commit, store the call's status, result and timestamps after a transition."""

    @abc.abstractmethod
    def references(
        self, person_uuid: UUID, organization_uuid: UUID, pledge_case_uuid: UUID | None
    ) -> References:
        """Look up, in one go, the rows a new call would point at."""

    @abc.abstractmethod
    def expire_exhausted(self, now: datetime, limit: int) -> Batch:
        """Expire up to ``limit`` of the calls due, oldest first, skipping any that another
        transaction holds (they are left for the next batch or sweep). A call listed as
        due that has ended or is managed elsewhere is taken off the list, so such rows can
        never fill a batch for good. When events are on, each call expired gets its
        ``call.expired`` event (by the sweep) in the same transaction."""


class ProcessedCommands(abc.ABC):
    """The outcome of every command handled, by command id: what makes commands idempotent."""

    @abc.abstractmethod
    def get(self, command_id: str) -> Outcome | None:
        """The outcome first recorded for this command id, if any."""

    @abc.abstractmethod
    def add(
        self, command_id: str, kind: str, call_uuid: UUID | None, outcome: Outcome,
        service_account_uuid: UUID | None = None,
    ) -> None:  # fmt: skip
        """Record the outcome (and the service account the command named) at commit, which
        raises DuplicateCommand if this command id is recorded already (waiting for a
        concurrent record of it to end first)."""


class CallEvents(abc.ABC):
    """The outbox of call events (``worker_call_events``, migration 0010)."""

    @abc.abstractmethod
    def add(self, event: CallEvent) -> None:
        """At commit, keep ``event`` (of the change of its call this unit of work made)."""


class NoCallEvents(CallEvents):
    """Events are off (CALLS_WORKER_EVENTS=off): nothing is written."""

    def add(self, event: CallEvent) -> None:
        pass


class ServiceAccounts(abc.ABC):
    """The service accounts commands act for (``worker_service_accounts``)."""

    @abc.abstractmethod
    def get(self, uuid: UUID) -> ServiceAccount | None:
        """The account as it is now (read in this unit of work); None if unknown."""


class DuplicateCommand(CallsWorkerError):
    """The command id has an outcome already: nothing of this transaction was kept."""


class CallUuidTaken(CallsWorkerError):
    """A call with the new call's uuid exists: nothing of this transaction was kept."""


class MissingReference(CallsWorkerError):
    """A row a new call points at does not exist: nothing of this transaction was kept."""


class CommandRefused(CallsWorkerError):
    """While a batch was applied, the database refused a statement written by one of
    ``tags`` (the commands whose writes the refused message carried): a unique or foreign
    key violation, a value it cannot take. The transaction is rolled back."""

    def __init__(self, tags: set[object], cause: BaseException) -> None:
        super().__init__(f"refused a write of one of {len(tags)} commands: {cause}")
        self.tags = tags
        self.cause = cause


class UnitOfWork(abc.ABC):
    """One transaction over the repositories; rolled back on exit unless committed.

    Reads happen at once; writes are kept until ``commit``, which sends them together
    (one round trip) and raises DuplicateCommand or CallUuidTaken when a write breaks
    uniqueness, or MissingReference when it points at nothing, in which case nothing is
    kept and the unit of work is rolled back.
    """

    calls: CallRepository
    processed_commands: ProcessedCommands
    service_accounts: ServiceAccounts
    events: CallEvents = NoCallEvents()

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
    def commit(self) -> None:
        """Write what is pending and commit.

        Raises DuplicateCommand, CallUuidTaken, MissingReference."""

    @abc.abstractmethod
    def rollback(self) -> None:
        """Undo everything since the last commit; the unit of work stays usable."""

    # What applying a batch of commands in one transaction needs (service/apply.py).
    # Until ``commit`` or ``rollback``, a statement the database refuses raises
    # CommandRefused naming the commands whose writes it carried.

    def begin_batch(
        self, command_ids: list[str], call_uuids: list[UUID], person_uuids: list[UUID]
    ) -> dict[str, Outcome]:
        """Open the batch's transaction: the outcomes recorded already for any of
        ``command_ids``, by command id; the calls ``call_uuids`` locked until it ends, and
        before them whatever the changes of those calls and of new calls for
        ``person_uuids`` will need, in an order every writer follows."""
        raise NotImplementedError(f"{type(self).__name__} does not apply batches")

    def start_command(self, tag: object) -> None:
        """The writes that follow are those of the command ``tag``."""
        raise NotImplementedError(f"{type(self).__name__} does not apply batches")

    def discard_command(self, tag: object) -> None:
        """Forget the writes of ``tag`` (those not sent yet: a broken rule raises before
        its command writes anything)."""
        raise NotImplementedError(f"{type(self).__name__} does not apply batches")

    def flush(self) -> None:
        """Send the writes now, without committing."""
        raise NotImplementedError(f"{type(self).__name__} does not flush")
