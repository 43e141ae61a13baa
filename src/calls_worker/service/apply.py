"""How a command is applied: in a batch, one transaction for many commands, each with its
own outcome. A lone command is a batch of one (``handle``); there is no other path.

``handle_batch`` applies commands in the order given, as if one came after the other: a
command reads what the earlier ones of its batch wrote (their writes go out in the same
message as its reads). Each gets the outcome it would get applied alone,
and the processed-command record stays the arbiter of "applied once": outcomes recorded
already are read in the batch's first message, and a command id twice in a batch gets
its first outcome.

One command never fails its neighbours, and no savepoint is used. When the database
refuses a command's write (a unique or foreign-key violation, a value it cannot take),
the transaction is rolled back and the batch is applied again in three parts, in order:
the commands before the refused one together, the refused one alone in a transaction of
its own (``_apply_alone``: a taken uuid, a missing row or a redelivery is then its
outcome), and the commands after it together. A message that carried the
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
from calls_worker.domain.errors import (
    CallAlreadyExists,
    DomainError,
    FieldError,
    Forbidden,
    InvalidCommand,
)
from calls_worker.domain.events import event_of
from calls_worker.domain.outcome import Outcome, failed, succeeded
from calls_worker.service.handlers import (
    HANDLERS,
    acting_account,
    not_found,
    references,
    utc_now,
)
from calls_worker.service.unit_of_work import (
    CallUuidTaken,
    CommandRefused,
    DuplicateCommand,
    MissingReference,
    UnitOfWork,
)


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
                one = _one(entry, i, uow, clock, policy)
                if one.refusal is not None:
                    kept[i] = one.refusal
                _add_record(entry, one.call_uuid, one.outcome, uow)
                staged[i] = one.outcome
                if careful:
                    uow.flush()
            current = None
            if first_of:  # else all were redeliveries: nothing to commit
                uow.commit()
    except CommandRefused:
        raise
    except stop_on as error:
        raise _Stop(error, current) from error
    except Exception as error:  # one command's alone (a defect, a value nothing checks)
        if current is None:
            raise
        raise CommandRefused({current}, error) from error
    result.commits += 1 if first_of else 0
    for i, outcome in staged.items():
        result.outcomes[i] = outcome
    for i, first in same_as.items():
        result.outcomes[i] = staged[first]
    result.kept.update(kept)


@dataclass(frozen=True)
class _Applied:
    """What applying a command left pending: its outcome and the call it is about; the
    refusal an operator must see, if it is one; the account that acted."""

    outcome: Outcome
    call_uuid: UUID | None
    refusal: DomainError | None = None
    account: ServiceAccount | None = None


def _one(
    entry: BatchEntry, tag: int, uow: UnitOfWork, clock: Callable[[], datetime],
    policy: AccessPolicy,
) -> _Applied:
    """Every check and the command's effect, once for every path: the timestamps, the
    account (who it is, what signed the message, its scope), then the handler (reach and
    the domain's rules). The writes stay pending; a broken rule is an outcome and leaves
    none."""
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
        return _Applied(succeeded(call), call.uuid, account=account)
    except DomainError as error:
        uow.discard_command(tag)
        refusal = error if isinstance(error, Forbidden) and error.kept else None
        return _Applied(failed(error), command.call_uuid_or_none, refusal, account)


def _add_record(entry: BatchEntry, call_uuid: UUID | None, outcome: Outcome,
                uow: UnitOfWork) -> None:  # fmt: skip
    uow.processed_commands.add(entry.command_id, entry.command.kind, call_uuid, outcome,
                               entry.command.service_account_uuid)  # fmt: skip


def _alone(
    entries: Sequence[BatchEntry], i: int, new_uow: Callable[[], UnitOfWork],
    clock: Callable[[], datetime], policy: AccessPolicy,
    stop_on: tuple[type[BaseException], ...], result: BatchResult,
) -> None:  # fmt: skip
    """The refused command on its own (``_apply_alone``)."""
    try:
        outcome, refusal = _apply_alone(entries[i], new_uow(), clock, policy)
    except stop_on as error:
        raise _Stop(error, i) from error
    except Exception as error:
        result.failed[i] = error
        return
    result.commits += 1
    result.outcomes[i] = outcome
    if refusal is not None:
        result.kept[i] = refusal


def _apply_alone(
    entry: BatchEntry, uow: UnitOfWork, clock: Callable[[], datetime], policy: AccessPolicy
) -> tuple[Outcome, DomainError | None]:
    """A command whose write the database refused in its batch, in a transaction of its
    own, where the refusal is its answer: a command id recorded meanwhile gets its first
    outcome (nothing applied), a taken uuid is a conflict, a row a create names that does
    not exist is not found. Its outcome, and its refusal to keep unless it was a
    redelivery."""
    command = entry.command
    with uow:
        uow.start_command(0)
        one = _one(entry, 0, uow, clock, policy)
        try:
            recorded = _record(entry, one.call_uuid, one.outcome, uow)
        except CallUuidTaken:
            taken = CallAlreadyExists(
                f"a call with uuid {one.call_uuid} exists already",
                [FieldError("uuid", "exists already")],
            )
            recorded = _record(entry, one.call_uuid, failed(taken), uow)
        except MissingReference:
            assert isinstance(command, CreateCall), "only a new call points at other rows"
            missing = not_found(command, references(command, uow, one.account))
            uow.rollback()
            recorded = _record(entry, one.call_uuid, failed(missing), uow)
    return recorded, one.refusal if recorded is one.outcome else None


def _record(entry: BatchEntry, call_uuid: UUID | None, outcome: Outcome,
            uow: UnitOfWork) -> Outcome:  # fmt: skip
    """Commit the effect with its outcome; a command id seen before gets its first outcome."""
    _add_record(entry, call_uuid, outcome, uow)
    try:
        uow.commit()
    except DuplicateCommand:
        first = uow.processed_commands.get(entry.command_id)
        assert first is not None, "a recorded command id cannot vanish"
        return first
    return outcome


def handle(
    command_id: str,
    command: Command,
    uow: UnitOfWork,
    clock: Callable[[], datetime] = utc_now,
    *,
    policy: AccessPolicy = OPEN,
    signer_sha256: str | None = None,
    on_kept: Callable[[DomainError], None] | None = None,
) -> Outcome:
    """Apply ``command`` once and return its outcome: a batch of one (``handle_batch``).

    Idempotent by ``command_id``: the effect happens once, and a command id seen before
    gets the outcome first recorded for it, even while the first delivery is still running
    (the second waits for it). The outcome is recorded in the transaction of the effect.
    Raises nothing for a broken rule: that is an error outcome; an error no rule explains
    is raised.

    ``policy`` and ``signer_sha256`` (the fingerprint of the certificate that signed the
    message) decide what the service account the command names may do (domain/access.py).
    ``on_kept`` is told of a refusal an operator must see (a claim the signature does not
    back), once its outcome is recorded.
    """
    result = handle_batch([BatchEntry(command_id, command, signer_sha256)], lambda: uow, clock,
                          policy=policy)  # fmt: skip
    if 0 in result.failed:
        raise result.failed[0]
    outcome = result.outcomes[0]
    assert outcome is not None, "a batch with nothing to stop on applies its command"
    if on_kept is not None and 0 in result.kept:
        on_kept(result.kept[0])
    return outcome
