"""Commands sent the way a worker's pool process applies them (worker/messages.py):
as a message with its task name, id and keyword arguments, ``signedFor`` and the signer
the worker's decoding adds when messages are signed. The access table, the stateful
model and the fuzz use it, on the fakes and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal
from uuid import uuid4

from calls_worker.domain.access import OPEN, AccessPolicy
from calls_worker.domain.commands import CommandKind
from calls_worker.service.unit_of_work import UnitOfWork
from calls_worker.wire import TASK_NAMES
from calls_worker.worker.messages import SIGNED_FOR, Applied, Message, apply_messages
from calls_worker.worker.signer import SIGNED_BY

Bound = Literal["own", "other task", "other id", "missing"]
"""What a signed message's ``signedFor`` names: its own id and task, or not."""


def message(
    kind: CommandKind, command: Any, *, command_id: str | None = None, signer: str | None = None,
    signed: bool = False, bound: Bound = "own",
) -> Message:  # fmt: skip
    """The message a producer sends (a signed one: as the worker decoded it)."""
    command_id = command_id or str(uuid4())
    task = TASK_NAMES[kind]
    kwargs: dict[str, Any] = {"command": command}
    if signed:
        names = {"own": {"id": command_id, "task": task},
                 "other task": {"id": command_id, "task": TASK_NAMES["expire"]},
                 "other id": {"id": str(uuid4()), "task": task}}  # fmt: skip
        if bound in names:
            kwargs[SIGNED_FOR] = names[bound]
        if signer is not None:
            kwargs[SIGNED_BY] = signer
    return Message(task, command_id, (), kwargs)


def send(
    new_uow: Callable[[], UnitOfWork], kind: CommandKind, command: Any, *,
    policy: AccessPolicy = OPEN, signer: str | None = None, command_id: str | None = None,
    bound: Bound = "own",
) -> Applied:  # fmt: skip
    """Apply one command as a pool process does; what became of it. An error that no rule
    explains (the worker would give the command up) is raised."""
    sent = message(kind, command, command_id=command_id, signer=signer, signed=policy.signed,
                   bound=bound)  # fmt: skip
    (applied,), _ = apply_messages([sent], new_uow, policy=policy, signed=policy.signed)
    if applied.failure is not None:
        raise applied.failure
    assert applied.outcome is not None
    return applied
