"""The producer client: validate a command here, queue it, read its outcome back.

Producers need the broker URL (and the result backend's, if it differs) and this package;
nothing of the worker runs here. Producers in other languages follow docs/wire-format.md.

    client = CallsClient("redis://broker:6379/0")
    handle = client.send("create", {"personUuid": ..., "organizationUuid": ...})
    outcome = handle.outcome(timeout=10)   # {"ok": true, "call": {...}}

With RabbitMQ, name where outcomes are kept: a Redis, or the worker's PostgreSQL.

    client = CallsClient("amqp://user:pw@rabbit:5672//", "postgresql://producer@db/calls")
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self
from uuid import UUID, uuid4

from celery import Celery
from celery.result import AsyncResult

from calls_worker.domain.access import ACCOUNT_FIELD
from calls_worker.domain.commands import (
    DEFAULT_PAGE,
    CommandKind,
    parse_command,
    parse_list_calls,
)
from calls_worker.domain.errors import FieldError, InvalidCommand
from calls_worker.domain.outcome import Outcome
from calls_worker.wire import (
    COMMAND_ID_LIMIT,
    COMMANDS_QUEUE,
    LIST_TASK,
    OUTCOME_TASK,
    TASK_NAMES,
    Signing,
    celery_config,
    close_app,
    command_headers,
    enable_signing,
)


class CommandFailed(Exception):
    """The worker gave up on the command (it is kept among the rejected commands)."""


class ListingRefused(Exception):
    """The worker refused a listing (the error outcome is ``.args[1]``)."""


# The first pause between two questions to the database for an ignored outcome; doubled
# up to 2 s.
_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class CommandHandle:
    """A queued command; ``command_id`` is also its Celery task id."""

    command_id: str
    command: dict[str, Any]
    _result: AsyncResult[Any]
    _client: CallsClient | None = None
    ignored: bool = False
    """Sent with ``ignore_result``: no outcome in the result backend, only in the database."""
    kind: CommandKind | None = None
    raw: str | None = None
    """The text sent by ``send_unchecked`` (sent again as it was)."""
    resent: list[float] = field(default_factory=list)
    """When (monotonic seconds) ``outcome`` sent the command again."""

    def outcome(self, timeout: float = 30.0, *, resend_after: float | None = None) -> Outcome:
        """Wait for the outcome: from the result backend, or, when it is not there (sent with
        ``ignore_result``, or kept there shorter than you waited), from the database, which
        keeps it for CALLS_WORKER_PROCESSED_RETENTION_HOURS. Raises TimeoutError, or
        CommandFailed if the worker gave up.

        ``resend_after``: each time this many seconds pass without an outcome, send the
        command again, as it was and under its command id (applied once all the same). With
        Redis as the broker a message can be lost after the broker handed it out: a worker
        process killed between taking it off the queue and recording it as unacknowledged
        (two steps in kombu's Redis transport). A producer that must not lose a command
        resends it so (docs/wire-format.md, "Delivery")."""
        deadline = time.monotonic() + timeout
        while True:
            wait = deadline - time.monotonic()
            if resend_after is not None:
                wait = min(wait, resend_after)
            try:
                return self._wait(max(wait, 0.1))
            except TimeoutError:
                if resend_after is None or time.monotonic() >= deadline:
                    raise
                self.resend()

    def _wait(self, timeout: float) -> Outcome:
        if self._client is None:
            return _from_backend(self._result, self.command_id, timeout)
        account = self.command.get(ACCOUNT_FIELD) if isinstance(self.command, dict) else None
        return self._client._await_outcome(
            self.command_id, None if self.ignored else self._result, timeout, late=False,
            account=None if account is None else str(account),
        )  # fmt: skip

    def resend(self) -> None:
        """Send the command again, as it was and under its command id (applied once all the
        same): what ``outcome(resend_after=…)`` does, for a producer that keeps the time of
        many commands itself instead of waiting for one at a time."""
        if self._client is None or self.kind is None:
            raise TimeoutError(f"no outcome for command {self.command_id}, and it cannot be"
                               " sent again from this handle")  # fmt: skip
        if self.raw is not None:
            self._client.send_unchecked(self.kind, self.raw, command_id=self.command_id)
        else:
            self._client.send(self.kind, self.command, command_id=self.command_id,
                              ignore_result=self.ignored)  # fmt: skip
        self.resent.append(time.monotonic())


# How often a producer asks PostgreSQL for an outcome it waits for (adapters/results.py);
# Redis tells a waiting producer at once instead.
POSTGRES_POLL_SECONDS = 0.05


def _interval(result: AsyncResult[Any]) -> float:
    return POSTGRES_POLL_SECONDS if hasattr(result.backend, "set_many") else 0.5


def _from_backend(result: AsyncResult[Any], command_id: str, timeout: float) -> Outcome:
    from celery.exceptions import TimeoutError as CeleryTimeout

    try:
        outcome: Outcome = result.get(timeout=timeout, propagate=False,
                                      interval=_interval(result))  # fmt: skip
    except CeleryTimeout as error:
        raise TimeoutError(f"no outcome for command {command_id} yet") from error
    if result.failed():
        raise CommandFailed(f"command {command_id} failed: {outcome!r}")
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
        service_account: str | UUID | None = None,
    ) -> None:
        """``result_backend_url``: where the worker keeps outcomes (its
        CALLS_WORKER_RESULT_BACKEND_URL): by default the broker, which must then be Redis;
        with a RabbitMQ broker, a ``redis://`` URL or the ``postgresql://`` URL of the
        worker's database (a role that may read and delete ``worker_results``).
        With RabbitMQ, ``send`` returns once the broker confirmed it has the message, and
        raises when it did not.
        ``signing``: sign commands, for a worker that accepts only signed messages.
        Celery's signing is set up for the whole process: one signing key per process.
        ``service_account``: the service account every command and listing is sent for
        (``serviceAccountUuid``), unless one names its own; where messages are signed,
        ``signing`` must hold that account's certificate."""
        self._service_account = None if service_account is None else str(service_account)
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
        ignore_result: bool = False,
    ) -> CommandHandle:
        """Validate and queue one command. Raises InvalidCommand before anything is sent.

        ``ignore_result``: store no outcome in the result backend (for producers that do not
        read it; it costs Redis memory for CALLS_WORKER_RESULT_RETENTION_SECONDS). The
        database keeps it anyway, and ``outcome()`` still finds it there.

        ``command_id``: set your own to make a resend after a crash a no-op; by default a
        new UUID. Sending the same command id twice has the effect once, as long as the
        worker still keeps the first one's outcome: for
        ``CALLS_WORKER_PROCESSED_RETENTION_HOURS`` (72 h by default). A resend after that is
        applied again.
        """
        payload = self._for_account(_decoded(kind, command))
        stamped = stamp(kind, payload, datetime.now(UTC))
        parse_command(kind, stamped)
        command_id = command_id or str(uuid4())
        if not (0 < len(command_id) <= COMMAND_ID_LIMIT and command_id.isprintable()):
            raise InvalidCommand(
                f"a command id is a printable string of 1 to {COMMAND_ID_LIMIT} characters",
                [FieldError("commandId", f"{len(command_id)} characters")],
            )
        kwargs: dict[str, Any] = {"command": stamped}
        if self._signed:  # the signature covers the body only: bind the id and task into it
            kwargs["signedFor"] = {"id": command_id, "task": TASK_NAMES[kind]}
        result = self._app.send_task(
            TASK_NAMES[kind], kwargs=kwargs, task_id=command_id, queue=COMMANDS_QUEUE,
            ignore_result=ignore_result, headers=command_headers(datetime.now(UTC)),
        )  # fmt: skip
        return CommandHandle(command_id, stamped, result, self, ignore_result, kind)

    def forget(self, command_id: str) -> None:
        """Drop whatever the result backend holds for ``command_id`` (the database's record
        of an outcome stays). An operator replaying a rejected command under its own id does
        so first: the answer stored there (a give-up, or ``invalid``) is not the replay's."""
        self._app.AsyncResult(command_id).forget()

    def _for_account(self, command: Mapping[str, Any]) -> Mapping[str, Any]:
        if self._service_account is None or ACCOUNT_FIELD in command:
            return command
        return {**command, ACCOUNT_FIELD: self._service_account}

    def list_calls(
        self,
        *,
        organization_uuid: str | UUID | None = None,
        person_uuid: str | UUID | None = None,
        status: str | None = None,
        type: str | None = None,
        limit: int = DEFAULT_PAGE,
        cursor: str | None = None,
        service_account_uuid: str | UUID | None = None,
        timeout: float = 30.0,
    ) -> Outcome:
        """One page of calls, newest first: ``{"ok": true, "calls": [...], "nextCursor":
        ...}`` (``nextCursor`` None on the last page), or an error outcome (``forbidden``
        without the scope ``calls:read``; ``invalid`` for a cursor that does not verify).
        A service account sees only the calls it reaches. Raises InvalidCommand before
        sending a query that is not one, TimeoutError if no answer came within ``timeout``."""
        given = {
            ACCOUNT_FIELD: service_account_uuid or self._service_account,
            "organizationUuid": organization_uuid, "personUuid": person_uuid,
            "status": status, "type": type, "cursor": cursor,
        }  # fmt: skip
        query: dict[str, Any] = {k: str(v) for k, v in given.items() if v is not None}
        query["limit"] = limit
        parse_list_calls(query)
        query_id = f"list-{uuid4()}"
        kwargs: dict[str, Any] = {"command": query}
        if self._signed:
            kwargs["signedFor"] = {"id": query_id, "task": LIST_TASK}
        answer = self._app.send_task(LIST_TASK, kwargs=kwargs, task_id=query_id,
                                     queue=COMMANDS_QUEUE)  # fmt: skip
        try:
            return _from_backend(answer, query_id, timeout)
        finally:
            answer.forget()

    def iter_calls(self, **query: Any) -> Iterator[dict[str, Any]]:
        """Every call of the listing, newest first, page after page (``list_calls``'s
        arguments); raises ListingRefused for an error outcome."""
        cursor = None
        while True:
            page = self.list_calls(**query, cursor=cursor)
            if not page["ok"]:
                raise ListingRefused(page["error"]["message"], page)
            yield from page["calls"]
            cursor = page["nextCursor"]
            if cursor is None:
                return

    def outcome(self, command_id: str, timeout: float = 30.0, *,
                service_account: str | UUID | None = None) -> Outcome:  # fmt: skip
        """The outcome of a command sent earlier (by this process or another): from the
        result backend while it keeps it, else from the database. Raises TimeoutError if
        there is none within ``timeout`` (not handled yet, or older than the database keeps
        outcomes), CommandFailed if the worker gave up on it.

        ``service_account``: the account that sent it (by default this client's); where
        accounts are required, the database answers only the account that sent a command."""
        account = service_account or self._service_account
        return self._await_outcome(
            command_id, self._app.AsyncResult(command_id), timeout, late=True,
            account=None if account is None else str(account),
        )  # fmt: skip

    def _await_outcome(
        self, command_id: str, result: AsyncResult[Any] | None, timeout: float,
        *, late: bool, account: str | None = None,
    ) -> Outcome:  # fmt: skip
        """Wait for an outcome. With ``result`` (the backend may hold it): from the backend,
        asking the database first if ``late`` (it may have left the backend), and once more
        when the wait runs out. Without (sent with ignore_result): from the database, asked
        at growing intervals, so that waiting producers cost the worker little."""
        deadline = time.monotonic() + timeout
        if result is not None:
            if late and not result.ready():
                kept = self._ask_database(command_id, min(timeout, 10.0), account)
                if kept is not None:
                    return kept
            try:
                return _from_backend(result, command_id, max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                kept = self._ask_database(command_id, 5.0, account)
                if kept is None:
                    raise
                return kept
            except CommandFailed:
                # A failure the backend holds may be the worker's, not the command's: its
                # result could not be stored (the broker's Redis restarting, say) after the
                # command was applied. The database's outcome, if there is one, is the answer.
                kept = self._ask_database(command_id, 10.0, account)
                if kept is None:
                    raise
                return kept
        pause = _POLL_SECONDS
        while True:
            wait = max(0.1, min(deadline - time.monotonic(), 10))
            kept = self._ask_database(command_id, wait, account)
            if kept is not None:
                return kept
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no outcome for command {command_id} yet")
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 2.0)

    def _ask_database(self, command_id: str, timeout: float, account: str | None
                      ) -> Outcome | None:  # fmt: skip
        """The outcome the database keeps for ``command_id`` (calls.outcome), asked as the
        service account ``account`` (the one that sent it), or None."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        query: dict[str, Any] = {"commandId": command_id}
        if account is not None:
            query[ACCOUNT_FIELD] = account
        kwargs: dict[str, Any] = {"query": query}
        query_id = f"outcome-{uuid4()}"
        if self._signed:
            kwargs["signedFor"] = {"id": query_id, "task": OUTCOME_TASK}
        answer = self._app.send_task(OUTCOME_TASK, kwargs=kwargs, task_id=query_id,
                                     queue=COMMANDS_QUEUE)  # fmt: skip
        try:
            found: dict[str, Any] = answer.get(timeout=timeout, propagate=False,
                                               interval=_interval(answer))  # fmt: skip
        except CeleryTimeout:
            return None
        finally:
            answer.forget()
        if not isinstance(found, dict) or not found.get("found"):
            return None
        outcome: Outcome = found["outcome"]
        return outcome

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
            TASK_NAMES[kind], kwargs=kwargs, task_id=command_id, queue=COMMANDS_QUEUE,
            headers=command_headers(datetime.now(UTC)),
        )  # fmt: skip
        return CommandHandle(command_id, {}, result, self, kind=kind, raw=command)

    def close(self) -> None:
        close_app(self._app)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
