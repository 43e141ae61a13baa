"""The producer client: validate a command here, queue it, read its outcome back.

Producers need the broker URL (and the result backend's, if it differs) and this package;
nothing of the worker runs here. Producers in other languages follow docs/wire-format.md.

    client = CallsClient("redis://broker:6379/0")
    handle = client.send("create", {"personUuid": ..., "organizationUuid": ...})
    outcome = handle.outcome(timeout=10)   # {"ok": true, "call": {...}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self
from uuid import uuid4

from celery import Celery
from celery.result import AsyncResult

from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.wire import (
    COMMANDS_QUEUE,
    TASK_NAMES,
    Signing,
    celery_config,
    enable_signing,
)


class CommandFailed(Exception):
    """The worker gave up on the command (it is kept among the rejected commands)."""


@dataclass(frozen=True)
class CommandHandle:
    """A queued command; ``command_id`` is also its Celery task id."""

    command_id: str
    command: dict[str, Any]
    _result: AsyncResult[Any]

    def outcome(self, timeout: float = 30.0) -> Outcome:
        """Wait for the outcome. Raises TimeoutError, or CommandFailed if the worker gave up."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            outcome: Outcome = self._result.get(timeout=timeout, propagate=False)
        except CeleryTimeout as error:
            raise TimeoutError(f"no outcome for command {self.command_id} yet") from error
        if self._result.failed():
            raise CommandFailed(f"command {self.command_id} failed: {outcome!r}")
        return outcome


def stamp(kind: CommandKind, command: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The command with ``issuedAt`` (and, to create, the call's ``uuid``) filled in, so a
    retried command gives the same result as the first."""
    stamped = dict(command)
    stamped.setdefault("issuedAt", now.isoformat())
    if kind == "create":
        stamped.setdefault("uuid", str(uuid4()))
    return stamped


def _decoded(kind: CommandKind, command: Mapping[str, Any] | str) -> Mapping[str, Any]:
    if isinstance(command, Mapping):
        return command
    try:
        payload = json.loads(command)
    except ValueError:
        payload = None
    if not isinstance(payload, Mapping):
        parse_command(kind, command)  # raises InvalidCommand, saying what is wrong
        raise AssertionError("unreachable: a command that is not an object is invalid")
    return payload


class CallsClient:
    """Queues commands for the worker. Thread-safe; cheap to keep for a process's lifetime."""

    def __init__(
        self,
        broker_url: str,
        result_backend_url: str | None = None,
        *,
        signing: Signing | None = None,
    ) -> None:
        """``signing``: sign commands, for a worker that accepts only signed messages.
        Celery's signing is set up for the whole process: one signing key per process."""
        self._app = Celery("calls-client", set_as_current=False)
        self._app.conf.update(celery_config(broker_url, result_backend_url or broker_url))
        self._signed = signing is not None
        if signing is not None:
            enable_signing(self._app, signing)

    def send(
        self,
        kind: CommandKind,
        command: Mapping[str, Any] | str,
        *,
        command_id: str | None = None,
    ) -> CommandHandle:
        """Validate and queue one command. Raises InvalidCommand before anything is sent.

        ``command_id``: set your own to make a resend after a crash a no-op; by default a
        new UUID. Sending the same command id twice has the effect once, as long as the
        worker still keeps the first one's outcome: for
        ``CALLS_WORKER_PROCESSED_RETENTION_HOURS`` (72 h by default). A resend after that is
        applied again.
        """
        payload = _decoded(kind, command)
        stamped = stamp(kind, payload, datetime.now(UTC))
        parse_command(kind, stamped)
        command_id = command_id or str(uuid4())
        kwargs: dict[str, Any] = {"command": stamped}
        if self._signed:  # the signature covers the body only: bind the id and task into it
            kwargs["signedFor"] = {"id": command_id, "task": TASK_NAMES[kind]}
        result = self._app.send_task(
            TASK_NAMES[kind], kwargs=kwargs, task_id=command_id, queue=COMMANDS_QUEUE
        )
        return CommandHandle(command_id=command_id, command=stamped, _result=result)

    def send_unchecked(
        self, kind: CommandKind, command: str, *, command_id: str | None = None
    ) -> CommandHandle:
        """Queue ``command`` exactly as given, neither checked nor stamped: what a faulty
        producer would send. For operators reproducing a rejected message; producers use
        ``send``."""
        command_id = command_id or str(uuid4())
        kwargs: dict[str, Any] = {"command": command}
        if self._signed:
            kwargs["signedFor"] = {"id": command_id, "task": TASK_NAMES[kind]}
        result = self._app.send_task(
            TASK_NAMES[kind], kwargs=kwargs, task_id=command_id, queue=COMMANDS_QUEUE
        )
        return CommandHandle(command_id=command_id, command={}, _result=result)

    def close(self) -> None:
        self._app.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
