"""From command messages to their outcomes: the one path every command takes.

A pool process gets a batch of messages (one, when CALLS_WORKER_COMMAND_BATCH_SIZE is 1)
and ``apply_messages`` does, for each, what the worker does to a command and nothing
else: the message's arguments and ``signedFor`` checked against its headers, who signed
it, the command parsed, then (service/apply.py) its timestamps, its account, the
handler's reach and rules, its effect and outcome in the batch's transaction. What
becomes of each message afterwards is settling.py's to decide and batching.py's to do.

The table of the access rules, the fuzz and the stateful model call ``apply_messages`` as
the pool process does (tests/worker_path.py); the expiry table runs the worker's sweep
task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from calls_worker.domain.access import AccessPolicy
from calls_worker.domain.commands import Command, CommandKind, parse_command
from calls_worker.domain.errors import DomainError, FieldError, InvalidCommand
from calls_worker.domain.outcome import Outcome, failed
from calls_worker.service.apply import BatchEntry, BatchResult, handle_batch
from calls_worker.service.handlers import utc_now
from calls_worker.service.unit_of_work import UnitOfWork
from calls_worker.wire import TASK_NAMES
from calls_worker.worker.signer import SIGNED_BY, WORKERS_NAMES

KIND_BY_TASK: dict[str, CommandKind] = {name: kind for kind, name in TASK_NAMES.items()}
SIGNED_FOR = "signedFor"


@dataclass(frozen=True)
class Message:
    """A command message as a pool process gets it."""

    task_name: str
    command_id: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    """As the worker decoded them: with ``signedBy`` and ``signedOriginal`` when signed."""


@dataclass
class Applied:
    """What became of one message in the pool process."""

    outcome: Outcome | None = None
    """Its outcome, committed (or recorded before); None when it was not applied."""
    command: Command | None = None
    invalid: InvalidCommand | None = None
    """Refused before it was applied: to be kept (once) before it is answered."""
    refusal: DomainError | None = None
    """A refusal an operator must see (a claim the signature does not back): to be kept."""
    failure: BaseException | None = None
    """Why it was not applied: an error of its own, or what stopped its batch."""
    interrupted: bool = False
    """Whether the batch stopped while applying this one."""


def checked_arguments(
    message: Message, *, signed: bool
) -> tuple[Any, str | None]:  # fmt: skip
    """The ``command`` keyword argument, the only argument a command task takes, besides
    ``signedFor`` when messages are signed; and the fingerprint of the certificate that
    signed the message (``signedBy``, set by the worker's decoding with ``signedOriginal``:
    signer.py; unsigned, a body naming either is refused). Raises InvalidCommand.

    Celery's signing covers the body only, not the headers that carry the command id and
    the task name: a captured signed message could be sent again under a new id (a second
    attempt) or relabelled as another task (a cancel turned into an expire). A signed
    body therefore names its id and task in ``signedFor: {"id": ..., "task": ...}``,
    which must match the headers; when signing is on, a body without it is refused.
    """
    args, kwargs = message.args, message.kwargs
    given = set(kwargs) - (WORKERS_NAMES if signed else set())
    expected = {"command", SIGNED_FOR} if SIGNED_FOR in given else {"command"}
    if args or given != expected:
        raise InvalidCommand(
            "a command task takes exactly one keyword argument, command",
            [FieldError("kwargs", f"got {len(args)} positional and keywords {sorted(given)}")],
        )
    check_bound(kwargs.get(SIGNED_FOR), message, signed=signed)
    signer = kwargs.get(SIGNED_BY) if signed else None
    return kwargs["command"], signer if isinstance(signer, str) else None


def check_bound(bound: Any, message: Message, *, signed: bool) -> None:
    """``signedFor`` names the message's own id and task (see ``checked_arguments``)."""
    if bound is None and signed:
        raise InvalidCommand(
            "a signed command must name its command id and task in signedFor",
            [FieldError(SIGNED_FOR, "missing")],
        )
    if bound is not None and bound != {"id": message.command_id, "task": message.task_name}:
        raise InvalidCommand(
            "signedFor does not match the message: sent again under another id, or as another task",
            [FieldError(SIGNED_FOR, f"names {bound!r}; the message is {message.task_name} "
                        f"{message.command_id}")],
        )


def mapping_of(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise InvalidCommand(
            "command must be a JSON object",
            [FieldError("command", f"got {type(payload).__name__}")],
        )
    return payload


def parsed(message: Message, *, signed: bool) -> BatchEntry:
    """The message's command, with its id and signer. Raises InvalidCommand."""
    payload, signer = checked_arguments(message, signed=signed)
    kind = KIND_BY_TASK[message.task_name]
    command = parse_command(kind, payload if isinstance(payload, str) else mapping_of(payload))
    return BatchEntry(message.command_id, command, signer)


def apply_messages(
    messages: Sequence[Message],
    new_uow: Callable[[], UnitOfWork],
    *,
    policy: AccessPolicy,
    signed: bool,
    stop_on: tuple[type[BaseException], ...] = (),
    clock: Callable[[], datetime] = utc_now,
) -> tuple[list[Applied], BatchResult]:
    """Check, parse and apply ``messages`` in order, the valid ones in one batch
    (service/apply.py); what became of each, and the batch's result."""
    applied = [Applied() for _ in messages]
    entries: list[BatchEntry] = []
    at: list[int] = []  # the message of each entry
    for n, message in enumerate(messages):
        try:
            entry = parsed(message, signed=signed)
        except InvalidCommand as error:
            applied[n].invalid = error
            applied[n].outcome = failed(error)
            continue
        applied[n].command = entry.command
        entries.append(entry)
        at.append(n)
    result = handle_batch(entries, new_uow, clock, policy=policy, stop_on=stop_on)
    for e, outcome in enumerate(result.outcomes):
        one = applied[at[e]]
        one.outcome = outcome
        one.refusal = result.kept.get(e)
        if outcome is None:
            one.failure = result.failed.get(e, result.stopped_by)
            one.interrupted = e in result.failed or e == result.stopped_at
    return applied, result
