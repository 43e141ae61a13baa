"""Keeping a command among the rejected ones (``worker_rejected_commands``), where an
operator sees it and can replay it (``calls-worker dead-letters``), and the one log line
and counter of each command's outcome."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from calls_worker.adapters.db import journal
from calls_worker.domain.commands import Command
from calls_worker.domain.errors import DomainError, InvalidCommand
from calls_worker.domain.outcome import Outcome
from calls_worker.worker.logs import COMMANDS_LOGGER
from calls_worker.worker.messages import KIND_BY_TASK, Message
from calls_worker.worker.metrics import worker_metrics
from calls_worker.worker.runtime import Runtime
from calls_worker.worker.signer import as_sent

logger = logging.getLogger("calls_worker")
command_lines = logging.getLogger(COMMANDS_LOGGER)

# How much of a command's body a log line shows (the rejected-commands table keeps it all).
LOGGED_PREFIX = 512


class CommandGaveUp(Exception):
    """A command failed through every retry and is kept among the rejected commands."""


def raw_body(args: Any, kwargs: Mapping[str, Any]) -> str:
    """The message's body as kept among the rejected commands: as the producer sent it
    (without what the worker's decoding added: ``signedBy``, ``signedOriginal``)."""
    return journal.dumps([list(args), as_sent(kwargs), {}])


def keep_invalid(runtime: Runtime, message: Message, error: InvalidCommand) -> None:
    """A command that cannot be parsed: kept among the rejected ones, once however often it
    comes (its error outcome is its answer)."""
    rejected_id = journal.record_rejected(
        runtime.engine(), task_name=message.task_name, command_id=message.command_id,
        raw_body=raw_body(message.args, message.kwargs), reason=error.message,
        details=error.details, once=True,
    )  # fmt: skip
    worker_metrics().rejection("task")
    kind = KIND_BY_TASK[message.task_name]
    logger.warning("command %s %s rejected as %s: %s", kind, message.command_id, rejected_id,
                   error.message, extra={"command_id": message.command_id, "kind": kind,
                                         "rejected_id": rejected_id})  # fmt: skip


def keep_refused(runtime: Runtime, message: Message, error: DomainError) -> None:
    """A refusal an operator must see (a claim the signature does not back), kept."""
    rejected_id = journal.record_rejected(
        runtime.engine(), task_name=message.task_name, command_id=message.command_id,
        raw_body=raw_body(message.args, message.kwargs), reason=error.message,
        details=error.details,
    )  # fmt: skip
    worker_metrics().rejection("forbidden")
    logger.warning("command %s %s refused and kept as %s: %s", KIND_BY_TASK[message.task_name],
                   message.command_id, rejected_id, error.message,
                   extra={"command_id": message.command_id,
                          "rejected_id": rejected_id})  # fmt: skip


def give_up(runtime: Runtime, task_name: str, command_id: str, args: Any,
            kwargs: Mapping[str, Any], reason: str) -> int:  # fmt: skip
    """Keep a command given up with ``reason``, on a connection of its own (the pool's may
    be what failed); its rejected id. Raises when the database cannot keep it."""
    rejected_id = journal.record_rejected(
        runtime.unpooled_engine(), task_name=task_name, command_id=command_id,
        raw_body=raw_body(args, kwargs), reason=reason,
    )  # fmt: skip
    worker_metrics().rejection("gave_up")
    logger.error("command %s %s; kept as rejected command %s", command_id, reason, rejected_id,
                 extra={"command_id": command_id, "rejected_id": rejected_id})  # fmt: skip
    return rejected_id


def log_outcome(command: Command, message: Message, outcome: Outcome) -> None:
    """The one log line and the counter of a command's outcome."""
    kind, command_id = command.kind, message.command_id
    call_uuid = outcome["call"]["uuid"] if outcome["ok"] else command.call_uuid_or_none
    code = "ok" if outcome["ok"] else outcome["error"]["code"]
    worker_metrics().command(kind, code)
    command_lines.info(
        "command %s %s call=%s outcome=%s",
        kind,
        command_id,
        call_uuid,
        code,
        extra={
            "command_id": command_id,
            "kind": kind,
            "call_uuid": str(call_uuid),
            "outcome": code,
            "service_account_uuid": str(command.service_account_uuid),
        },
    )
