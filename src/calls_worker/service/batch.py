"""Group commit: many commands applied in one transaction, each with its own outcome.

``handle_batch`` applies commands in the order given, as if one came after the other: a
command reads what the earlier ones of its batch wrote (their writes go out in the same
message as its reads). Each gets exactly the outcome ``handlers.handle`` would give it,
and the processed-command record stays the arbiter of "applied once": outcomes recorded
already are read in the batch's first message, and a command id twice in a batch gets
its first outcome.

One command never fails its neighbours, and no savepoint is used. When the database
refuses a command's write (a unique or foreign-key violation, a value it cannot take),
the transaction is rolled back and the batch is applied again in three parts, in order:
the commands before the refused one together, the refused one alone through ``handle``
(which turns a taken uuid, a missing row or a redelivery into its outcome, exactly as
for a lone command), and the commands after it together. A message that carried the
writes of several commands is first narrowed down by applying the batch again with each
command's writes sent on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from calls_worker.domain.access import OPEN, AccessPolicy, ServiceAccount
from calls_worker.domain.commands import Command, CreateCall, absurd_timestamps
from calls_worker.domain.errors import DomainError, Forbidden, InvalidCommand
from calls_worker.domain.events import event_of
from calls_worker.domain.outcome import Outcome, failed, succeeded
from calls_worker.service.handlers import HANDLERS, acting_account, handle, utc_now
from calls_worker.service.unit_of_work import CommandRefused, UnitOfWork


@dataclass(frozen=True)
class BatchEntry:
    """A command of a batch: its id, the command, and who signed its message."""

    command_id: str
    command: Command
    signer_sha256: str | None = None


@dataclass
class BatchResult:
    """What became of each entry, by position.

    ``outcomes[i]`` is the outcome of entry i (recorded, or recorded before), or None when
    it was not applied: ``failed[i]`` then holds the error that no rule explains (the
    entry alone raised it), or the batch stopped (``stopped_by``) before reaching it.
    ``kept[i]`` is a refusal an operator must see (see ``handle``'s ``on_kept``), told
    once its outcome is committed. ``commits`` counts the transactions committed.
    """

    outcomes: list[Outcome | None]
    failed: dict[int, Exception] = field(default_factory=dict)
    kept: dict[int, DomainError] = field(default_factory=dict)
    stopped_by: BaseException | None = None
    stopped_at: int | None = None
    """The entry being applied when the batch stopped (None: between commands)."""
    commits: int = 0
    redone: int = 0
    """How many times a part of the batch was applied again after a refused write."""

    @property
    def applied(self) -> list[int]:
        return [i for i, outcome in enumerate(self.outcomes) if outcome is not None]


class _Stop(Exception):
    def __init__(self, error: BaseException, at: int | None) -> None:
        super().__init__(repr(error))
        self.error = error
        self.at = at


def handle_batch(
    entries: Sequence[BatchEntry],
    new_uow: Callable[[], UnitOfWork],
    clock: Callable[[], datetime] = utc_now,
    *,
    policy: AccessPolicy = OPEN,
    stop_on: tuple[type[BaseException], ...] = (),
) -> BatchResult:
    """Apply ``entries`` in order, in one transaction when nothing is refused.

    ``stop_on``: errors that end the batch where it is (the database away, a time limit):
    what was committed keeps its outcome, the rest is left unapplied (``stopped_by``).
    Any other error a command raises is that command's alone (``failed``).
    """
    result = BatchResult(outcomes=[None] * len(entries))
    try:
        _apply(entries, list(range(len(entries))), new_uow, clock, policy, stop_on, result,
               careful=False)  # fmt: skip
    except _Stop as stop:
        result.stopped_by, result.stopped_at = stop.error, stop.at
    return result


def _apply(
    entries: Sequence[BatchEntry], indices: list[int], new_uow: Callable[[], UnitOfWork],
    clock: Callable[[], datetime], policy: AccessPolicy,
    stop_on: tuple[type[BaseException], ...], result: BatchResult, *, careful: bool,
) -> None:  # fmt: skip
    if not indices:
        return
    try:
        _together(entries, indices, new_uow, clock, policy, stop_on, result, careful=careful)
        return
    except CommandRefused as refused:
        culprits = [i for i in indices if i in refused.tags]
        if len(culprits) != 1 and not careful:
            result.redone += 1  # which one? each command's writes on their own says
            _apply(entries, indices, new_uow, clock, policy, stop_on, result, careful=True)
            return
        culprit = culprits[0] if culprits else indices[0]
    result.redone += 1
    at = indices.index(culprit)
    _apply(entries, indices[:at], new_uow, clock, policy, stop_on, result, careful=careful)
    _alone(entries, culprit, new_uow, clock, policy, stop_on, result)
    _apply(entries, indices[at + 1 :], new_uow, clock, policy, stop_on, result, careful=careful)


def _together(
    entries: Sequence[BatchEntry], indices: list[int], new_uow: Callable[[], UnitOfWork],
    clock: Callable[[], datetime], policy: AccessPolicy,
    stop_on: tuple[type[BaseException], ...], result: BatchResult, *, careful: bool,
) -> None:  # fmt: skip
    """Apply ``indices`` in one transaction; their outcomes once it committed."""
    staged: dict[int, Outcome] = {}
    kept: dict[int, DomainError] = {}
    first_of: dict[str, int] = {}
    same_as: dict[int, int] = {}
    current: int | None = None
    try:
        with new_uow() as uow:
            calls = [c for i in indices
                     if not isinstance(entries[i].command, CreateCall)
                     and (c := entries[i].command.call_uuid_or_none) is not None]  # fmt: skip
            people = [create.person_uuid for i in indices
                      if isinstance(create := entries[i].command, CreateCall)]  # fmt: skip
            recorded = uow.begin_batch(sorted({entries[i].command_id for i in indices}), calls,
                                       people)  # fmt: skip
            for i in indices:
                entry = entries[i]
                if (before := recorded.get(entry.command_id)) is not None:
                    staged[i] = before  # a redelivery: its first outcome, nothing applied
                    continue
                if entry.command_id in first_of:
                    same_as[i] = first_of[entry.command_id]
                    continue
                first_of[entry.command_id] = current = i
                uow.start_command(i)
                outcome, call_uuid, refusal = _one(entry, i, uow, clock, policy)
                if refusal is not None:
                    kept[i] = refusal
                uow.processed_commands.add(
                    entry.command_id, entry.command.kind, call_uuid, outcome,
                    entry.command.service_account_uuid,
                )  # fmt: skip
                staged[i] = outcome
                if careful:
                    uow.flush()
            current = None
            uow.commit()
    except CommandRefused:
        raise
    except stop_on as error:
        raise _Stop(error, current) from error
    except Exception as error:  # one command's alone (a defect, a value nothing checks)
        if current is None:
            raise
        raise CommandRefused({current}, error) from error
    result.commits += 1
    for i, outcome in staged.items():
        result.outcomes[i] = outcome
    for i, first in same_as.items():
        result.outcomes[i] = staged[first]
    result.kept.update(kept)


def _one(
    entry: BatchEntry, tag: int, uow: UnitOfWork, clock: Callable[[], datetime],
    policy: AccessPolicy,
) -> tuple[Outcome, UUID | None, DomainError | None]:
    """What ``handle`` does before it records: the command's effect (writes pending) and
    outcome; a broken rule is an outcome and leaves no write."""
    command = entry.command
    now = command.issued_at or clock()
    account: ServiceAccount | None = None
    try:
        if absurd := absurd_timestamps(command, clock()):
            raise InvalidCommand("timestamps in the far future", absurd)
        account = acting_account(command.service_account_uuid, command.kind, uow,
                                 policy=policy, signer_sha256=entry.signer_sha256)  # fmt: skip
        call = HANDLERS[type(command)](command, uow, now, account)
        uow.events.add(event_of(command.kind, call, now))
        return succeeded(call), call.uuid, None
    except DomainError as error:
        uow.discard_command(tag)
        refusal = error if isinstance(error, Forbidden) and error.kept else None
        return failed(error), command.call_uuid_or_none, refusal


def _alone(
    entries: Sequence[BatchEntry], i: int, new_uow: Callable[[], UnitOfWork],
    clock: Callable[[], datetime], policy: AccessPolicy,
    stop_on: tuple[type[BaseException], ...], result: BatchResult,
) -> None:  # fmt: skip
    """The refused command on its own, exactly as a lone command is handled."""
    entry = entries[i]
    refusals: list[DomainError] = []
    try:
        outcome = handle(entry.command_id, entry.command, new_uow(), clock, policy=policy,
                         signer_sha256=entry.signer_sha256, on_kept=refusals.append)  # fmt: skip
    except stop_on as error:
        raise _Stop(error, i) from error
    except Exception as error:
        result.failed[i] = error
        return
    result.commits += 1
    result.outcomes[i] = outcome
    if refusals:
        result.kept[i] = refusals[0]
